"""What a pivotal-tuning run's adapter adds to its identifier embedding, on the embedded base.

    python scripts/adapter_vs_embedding.py ADAPTER.safetensors EMBEDDING.safetensors SUBJECT_DIR [--n 48]

Judges the base with the embedding alone, then with the embedding and the adapter, on the
learning benchmark's measures (subject, its attributes, new backgrounds, class drift; n images per
prompt kind, the bench's seed), and prints one line per condition. SUBJECT_DIR holds the
subject.json that `loldu_diffusion.toy.concepts` writes (e.g. assets/concepts/sks-heart).
"""
import argparse

from loldu_diffusion.adapter_file import AdapterFile, load_adapter
from loldu_diffusion.bench.learning import judge_model
from loldu_diffusion.embeddings import load_token_embeddings
from loldu_diffusion.pipeline import load_base
from loldu_diffusion.toy.concepts import read_subject
from loldu_diffusion.toy.judge import load_judge

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("adapter")
p.add_argument("embedding")
p.add_argument("subject_dir")
p.add_argument("--n", type=int, default=48)
a = p.parse_args()
subject, judge, pipe = read_subject(a.subject_dir), load_judge(), load_base(None)
load_token_embeddings(pipe, a.embedding)
rows = {"embedding alone": judge_model(pipe, judge, subject, a.n)}
load_adapter(pipe, AdapterFile.read(a.adapter), adapter_name="adapter", weight=1.0)
rows["embedding + adapter"] = judge_model(pipe, judge, subject, a.n)
for name, measures in rows.items():
    print(f"{name:20s}", "  ".join(f"{k} {v:.2f}" for k, v in measures.items()))
