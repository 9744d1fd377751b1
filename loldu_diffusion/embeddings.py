"""Token embeddings trained beside an adapter (--train_text_encoder_ti, --method ti).

The file is diffusers' textual-inversion layout, `{token: (1, width)}` (or `(width,)`) in
safetensors; on SDXL, SDXL's `{"clip_l": (1, 768), "clip_g": (1, 1280)}` with the token in the metadata. The identifier is a word the tokenizer already has as one token ("sks"), so
loading writes its row of the text encoder's embedding table — what the trainer's hook did
during training — instead of adding a token as diffusers' `load_textual_inversion` does (it
refuses a token the vocabulary has).

Files come from strangers: safetensors only, at most a few tokens, every tensor checked for
shape, dtype and finite values, one-line errors that name the file.
"""
from __future__ import annotations

import os

import torch

from .config import ADAPTER_FILE

EMBEDDINGS_FILE = "learned_embeds.safetensors"  # what the trainer writes beside the adapter (diffusers' name)
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")  # SDXL's layout (diffusers' advanced script, kohya, A1111): a row per text encoder
MAX_BYTES = 2**20  # a few rows of ≤ 1,280 floats; SD 1.5's width is 768
MAX_TOKENS = 16
# A row far beyond the table's own scale is not a trained embedding (the embedded base's rows
# have norms ≤ 1, SD 1.5's ≤ 1.5; a pivotal-tuning run at lr 1e-2 stays within a few times that).
NORM_BOUND = 100.0


class EmbeddingFileError(ValueError):
    """A file that is not a token-embedding file for this text encoder."""


class EmbeddingRows(dict):
    """(text encoder k, token id) → (token, row), and `sha256`, of the bytes they were read from."""
    sha256 = ""


def read_embedding_rows(path: str, num_encoders: int | None = None, digest: list | None = None) -> list[tuple[int, str, torch.Tensor]]:
    """[(text encoder k, token, row)] of a token-embedding file, checked as far as the file alone
    allows (size, count, layout, dtype, finite, scale): before a base model loads. The file is
    read once (what is checked is what is used; its sha256 is appended to `digest` if given).
    Errors name the file."""
    import hashlib

    from safetensors.torch import load as load_bytes

    from .io import read_bounded, safetensors_header

    data = read_bounded(path, MAX_BYTES, EmbeddingFileError, "token-embedding file")  # it holds a few rows
    try:
        header = safetensors_header(data, MAX_BYTES)
        keys = [k for k in header if k != "__metadata__"]
        if not 0 < len(keys) <= MAX_TOKENS:
            raise EmbeddingFileError(f"{path}: {len(keys)} tensors; expected 1 to {MAX_TOKENS} ({{token: (1, width)}})")
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("its metadata must map names to strings")
        tensors = dict(sorted(load_bytes(data).items()))  # in name order, as safe_open lists them
    except EmbeddingFileError:
        raise
    except Exception as e:
        raise EmbeddingFileError(f"{path}: not a readable safetensors file ({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    if digest is not None:
        digest.append(hashlib.sha256(data).hexdigest())
    if set(tensors) == set(SDXL_EMBEDDING_KEYS):
        if num_encoders not in (None, 2):
            raise EmbeddingFileError(f"{path}: an SDXL embedding (clip_l, clip_g) for a base with two text encoders; "
                                     f"this base has {num_encoders}")
        token = meta.get("token")
        if not token:
            raise EmbeddingFileError(f"{path}: an SDXL embedding without its token in the metadata ('token'); "
                                     "this loader writes the rows of a word the tokenizer has")
        entries = [(k, token, tensors[key]) for k, key in enumerate(SDXL_EMBEDDING_KEYS)]
    else:
        if num_encoders == 2:  # SDXL draws with both tables: a row for the first alone is half an embedding (another base's?)
            raise EmbeddingFileError(f"{path}: one row per token ({{token: (1, width)}}), but this base has two text encoders "
                                     "(SDXL): its embeddings hold a row for each, as {\"clip_l\": (1, 768), \"clip_g\": (1, 1280)} "
                                     "with the token in the metadata; an embedding trained on SD 1.x/2.x?")
        entries = [(0, token, t) for token, t in tensors.items()]
    for _, token, t in entries:
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise EmbeddingFileError(f"{path}: {token!r} is {t.dtype}, not a float tensor")
        if t.dim() not in (1, 2) or (t.dim() == 2 and t.shape[0] != 1):
            raise EmbeddingFileError(f"{path}: {token!r} has shape {tuple(t.shape)}; a token's row is (1, width)")
        if not torch.isfinite(t).all() or float(t.float().norm()) > NORM_BOUND:
            raise EmbeddingFileError(f"{path}: {token!r} has values that are not finite or far out of scale")
    return entries


def read_token_embeddings(path: str, encoders: list) -> EmbeddingRows:
    """(text encoder k, token id) → (token, (width,) float32) of a checked file, for `encoders` [(tokenizer, width), …]:
    `{token: (1, width)}` rows for the first table, or SDXL's layout `{"clip_l": (1, 768), "clip_g": (1, 1280)}` (its
    token in the metadata, as the trainer writes it) for both."""
    digest = []
    entries = read_embedding_rows(path, len(encoders), digest)
    rows = EmbeddingRows()
    rows.sha256 = digest[0]
    for k, token, t in entries:
        tokenizer, width = encoders[k]
        if t.shape[-1] != width:
            raise EmbeddingFileError(f"{path}: {token!r} has shape {tuple(t.shape)}; this text encoder needs "
                                     f"(1, {width}) — an embedding trained on another base model?")
        ids = tokenizer(token, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise EmbeddingFileError(f"{path}: {token!r} is {len(ids)} tokens of this tokenizer, not one; "
                                     "train with a one-token identifier (--placeholder_token)")
        if ids[0] in tokenizer.all_special_ids:  # e.g. <|endoftext|>, which ends and pads every prompt
            raise EmbeddingFileError(f"{path}: {token!r} is a special token of the tokenizer; an embedding is for a word")
        if (k, ids[0]) in rows:
            raise EmbeddingFileError(f"{path}: {rows[(k, ids[0])][0]!r} and {token!r} are the same token of this tokenizer; "
                                     "keep one of them")
        rows[(k, ids[0])] = (token, t.float().reshape(width))
    return rows


def embedding_beside(adapter_path: str) -> str | None:
    """The identifier embedding that goes with an adapter file, if there is one: NAME.learned_embeds.safetensors
    beside NAME.safetensors (a folder of several adapters, as the bundled one), or the trainer's
    learned_embeds.safetensors beside its loldu_adapter.safetensors (not beside any other adapter a
    folder holds: that one run's token would be given to every file there)."""
    folder, name = os.path.split(os.path.abspath(adapter_path))
    for candidate in (name.removesuffix(".safetensors") + "." + EMBEDDINGS_FILE,) + ((EMBEDDINGS_FILE,) if name == ADAPTER_FILE else ()):
        if os.path.isfile(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    return None


def is_embedding_file(path: str) -> bool:
    """Whether a .safetensors file is laid out as token embeddings rather than as an adapter:
    the trainer's file name, or tensors named by tokens (no 'unet.' prefix) without adapter metadata."""
    from safetensors import safe_open

    if os.path.basename(path).endswith(EMBEDDINGS_FILE):
        return True
    try:
        with safe_open(path, framework="pt") as f:
            keys, meta = list(f.keys()), f.metadata() or {}
    except Exception:  # noqa: BLE001 — not readable: the adapter reader says why
        return False
    return 0 < len(keys) <= MAX_TOKENS and "loldu" not in meta and all("." not in k for k in keys)


def encoder_pairs(models) -> list:
    """(tokenizer, text encoder) of a pipeline or the trainer's models: one, or SDXL's two."""
    pairs = [(models.tokenizer, models.text_encoder)]
    if getattr(models, "text_encoder_2", None) is not None:
        pairs.append((models.tokenizer_2, models.text_encoder_2))
    return pairs


def pipeline_tables(pipe) -> list:
    """(tokenizer, embedding table (vocab, width)) of each of the pipeline's text encoders: one, or SDXL's two."""
    return [(tok, enc.get_input_embeddings().weight) for tok, enc in encoder_pairs(pipe)]


def read_pipeline_embeddings(pipe, path: str) -> dict[tuple[int, int], tuple[str, torch.Tensor]]:
    """`read_token_embeddings` for the pipeline's text encoders and tokenizers."""
    return read_token_embeddings(path, [(tok, table.shape[1]) for tok, table in pipeline_tables(pipe)])


@torch.no_grad()
def load_token_embeddings(pipe, path: str) -> list[str]:
    """Write the file's rows into the pipeline's text-encoder embedding tables (both on SDXL for its layout);
    returns the tokens."""
    tables = [table for _, table in pipeline_tables(pipe)]
    rows = read_pipeline_embeddings(pipe, path)
    for (k, token_id), (_, row) in rows.items():
        tables[k][token_id] = row.to(tables[k].dtype)
    return list(dict.fromkeys(token for token, _ in rows.values()))


class TokenRows:
    """The text encoders' embedding tables as the base's plus exactly the rows asked for, so
    that callers taking turns on one pipeline (the app's sessions, `loldu generate`'s prompts)
    each draw with their own identifier rows and nobody else's."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.base: dict[tuple[int, int], torch.Tensor] = {}  # (encoder, token id) → the table's own row, while replaced

    @torch.no_grad()
    def use(self, rows: dict) -> None:
        """Make the tables the base's plus `rows` ((encoder, token id) → (token, row)); use({})
        puts the base's back."""
        tables = [table for _, table in pipeline_tables(self.pipe)]  # (vocab, width) each
        for k, i in set(self.base) - set(rows):
            tables[k][i] = self.base.pop((k, i))
        for (k, i), (_, row) in rows.items():
            self.base.setdefault((k, i), tables[k][i].clone())
            tables[k][i] = row.to(tables[k].dtype)
