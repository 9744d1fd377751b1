"""Write the CLIP tokenizer files the single-file configs use (loldu_diffusion/configs/clip/:
vocab.json, merges.txt; 49,408 tokens), from the BPE file OpenAI's CLIP ships,
`bpe_simple_vocab_16e6.txt.gz` (MIT; also in the open_clip_torch wheel, which is where this
script takes it from: `pip download open_clip_torch --no-deps -d DIR`).

The Hugging Face CLIP vocabulary is CLIP's own `SimpleTokenizer` vocabulary written out: the
256 byte characters (GPT-2's bytes_to_unicode), the same with `</w>`, one token per merge
(lines 1..48894 of the BPE file), then <|startoftext|> and <|endoftext|>. SD 1.x, SD 2.x
(OpenCLIP) and both SDXL tokenizers use this vocabulary; they differ only in the pad token
(tokenizer_config.json of each family folder).

    python scripts/build_clip_tokenizer.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl
"""
import argparse
import gzip
import io
import json
import os
import sys
import zipfile

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "loldu_diffusion", "configs", "clip")
BPE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # 48894, as CLIP's SimpleTokenizer reads them
# a fact about the real tokenizer (openai/clip-vit-large-patch14) the output is checked against
KNOWN = ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407])


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (as CLIP's simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_bpe(source: str) -> list[str]:
    """The BPE file's lines, from the .gz itself or from an open_clip_torch wheel."""
    if source.endswith(".whl"):
        with zipfile.ZipFile(source) as z:
            data = z.read(BPE)
    else:
        with open(source, "rb") as f:
            data = f.read()
    return gzip.GzipFile(fileobj=io.BytesIO(data)).read().decode("utf-8").split("\n")


def build(lines: list[str]) -> tuple[dict[str, int], list[str]]:
    merges = lines[1 : N_MERGES + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == len(vocab), len(vocab)
    return {t: i for i, t in enumerate(vocab)}, merges


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="open_clip_torch-*.whl or bpe_simple_vocab_16e6.txt.gz")
    p.add_argument("--out", default=OUT, help="folder to write vocab.json and merges.txt to")
    a = p.parse_args(argv)
    vocab, merges = build(read_bpe(a.source))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
    with open(os.path.join(a.out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import CLIPTokenizer

    ids = CLIPTokenizer(vocab=os.path.join(a.out, "vocab.json"), merges=os.path.join(a.out, "merges.txt"))(KNOWN[0]).input_ids
    if ids != KNOWN[1]:
        print(f"error: {KNOWN[0]!r} tokenizes to {ids}, not {KNOWN[1]}", file=sys.stderr)
        return 1
    print(f"wrote {a.out}: {len(vocab)} tokens, {len(merges)} merges; {KNOWN[0]!r} → {ids}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
