"""The web app: one base model loaded once and shared; each browser session has its own adapters.

`Studio` holds what everyone shares (the base, the adapter files loaded onto it, a lock);
`Session` holds one browser tab's adapters, weights and results (tested directly); `build_ui`
wires them to Gradio. Switching or re-weighting adapters only recomputes each layer's blended δ:
the base is never reloaded, so it takes milliseconds.

Sessions never see each other's adapters: an adapter file is loaded onto the shared base once,
under a name no session shows. A token-embedding file (pivotal tuning's `learned_embeds.safetensors`,
loaded with the adapter beside it or on its own) is a session's too: its rows are written into the
text encoder's table only while that session's images are drawn (`Studio.use_rows`). Generations of different pages are batched (`app_batch.py`):
requests waiting together share pipeline calls, each image with its own session's blend
(per-sample δ); a fused generation serves one blend and runs alone, under the same lock.

The base is shared by everyone using the app, so no error may leave it changed: loading is
all or nothing, and a failed generation unfuses (which restores the exact base weights).
"""
from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass

import torch

from .adapter_file import AdapterFile, AdapterFileError, load_adapter
from .embeddings import EmbeddingFileError, TokenRows, embedding_beside, is_embedding_file, read_pipeline_embeddings
from .config import EXPORT_FORMATS
from .model import delete_adapter, fuse_loldu, loldu_disabled, set_adapter_weights, unfuse_loldu
from .pipeline import adapter_name_for, load_base
from .schedulers import DEFAULT as DEFAULT_SAMPLER
from .schedulers import make_scheduler

MAX_SLOTS = 6
MAX_UPLOAD_BYTES = 16 * 2**20
# the shared base's factors grow to the largest rank loaded (until it leaves): a full-rank file holds twice the base's
# attention weights in factors, and decomposes under the lock every user waits on; LoLDU adapters train at 4–64
MAX_RANK = 128
MAX_HISTORY = 48  # results a session's gallery keeps (the PNGs stay on disk)
MAX_SEED = 2**63 - 1  # torch's generators take 64 bits; seed + image index stays below 2**64
DEFAULT_OUTPUTS = "loldu-outputs"  # beside where the app starts, as A1111's outputs/ folder


def code(text) -> str:
    """A stranger's text as a Markdown code span: no backtick to close it early, one printable line."""
    text = "".join(c if c.isprintable() else " " for c in str(text)).replace("`", "'")
    return f"`{text[:200]}`"


@dataclass
class LoadedAdapter:
    name: str  # what the session shows
    path: str
    file: AdapterFile
    key: str  # the file's content hash: its one copy on the shared base
    weight: float = 1.0
    embedding: str | None = None  # the key of the embedding it came with (its subject needs it)

    def describe(self) -> str:
        m = self.file.metadata
        layers = ", ".join(f"{c} {len(r)}" for c, r in self.file.layers.items())
        return (f"**{self.name}** · trigger {code(m.get('instance_prompt') or '—')} · rank {self.file.rank} · layers {layers} · "
                f"{self.file.num_parameters:,} values · {self.file.nbytes:,} bytes · base {code(m.get('base_model') or '?')}")


@dataclass
class LoadedEmbedding:
    """A session's token embeddings: rows of the text encoders' tables, by (encoder, token id)."""
    path: str
    key: str  # the file's content hash
    rows: dict  # (text encoder k, token id) → (token, (width,) float32); SDXL's layout has a row in each table

    def tokens(self) -> list[str]:
        return list(dict.fromkeys(t for t, _ in self.rows.values()))

    def describe(self) -> str:
        tokens = ", ".join(code(t) for t in self.tokens())
        return f"embedding of {tokens} from {code(os.path.basename(self.path))}"


@dataclass(frozen=True)
class Drawn:
    """What a session's images are drawn with, read once as its generation starts: a slider moved
    or an adapter removed meanwhile changes the next images, not these nor their captions."""
    on_base: dict  # name on the shared base → weight (non-zero only)
    shown: dict  # the names the session shows → weight
    text: str  # for captions: "dog:0.8, style:0.3 + embedding of sks"
    embeddings: list  # the token-embedding files in use
    rows: dict  # their rows: (text encoder, token id) → (token, row)
    embedding_keys: tuple  # their content hashes: requests with the same ones share pipeline calls


def _rows(embeddings) -> dict:
    """(text encoder, token id) → (token, row) of these embeddings."""
    return {i: r for e in embeddings for i, r in e.rows.items()}


def read_embedding(pipe, path: str, held, where: str) -> LoadedEmbedding:
    """A token-embedding file, checked, and refused if a token of it already has another file's
    embedding among `held` (two rows for one token cannot both be drawn)."""
    rows = read_pipeline_embeddings(pipe, path)
    key = rows.sha256  # of the bytes read and checked
    for other in held:
        clash = sorted({t for i, (t, _) in rows.items() if i in other.rows})
        if clash and other.key != key:
            raise EmbeddingFileError(f"{os.path.basename(path)}: the token(s) {clash} already have an embedding in {where} "
                                     f"({os.path.basename(other.path)}); remove it first")
    return LoadedEmbedding(path, key, rows)


def adapter_files(folder: str | None) -> list[str]:
    """The adapter files of a folder, sorted; the token-embedding files beside them are not adapters."""
    if not folder or not os.path.isdir(folder):
        return []
    paths = (os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors"))
    return sorted(p for p in paths if not is_embedding_file(p))


def _first_prompt(preloaded) -> str | None:
    """The prompt an adapter's trainer validated with (else its trigger): the one it is known to
    draw its subject for. Added scenery can fail on a small adapter, so none is added."""
    m = preloaded[2].metadata
    return m.get("validation_prompt") or m.get("instance_prompt")


class Studio:
    """What all sessions share: the base model, the adapter files loaded onto it, the lock."""

    def __init__(self, base: str | None = None, adapters_dir: str | None = None, device: str | None = None,
                 preload=(), outputs_dir: str | None = None, default_prompt: str | None = None, compile: bool = False):
        self.pipe = load_base(base, device=device)
        if compile:  # every blend, weight and batch of sessions keeps working: the UNet's guard (guard.py) refreshes δ before each call
            from .compile import compile_unet

            compile_unet(self.pipe.unet)
        self.base_path = self.pipe._loldu_base_path
        self.adapters_dir = adapters_dir
        self.outputs_dir = outputs_dir  # None: results are not written to disk
        self.native = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self.lock = threading.RLock()  # one user of the base at a time: loading, blending, generating
        self.on_base: dict[str, tuple[str, AdapterFile]] = {}  # file key → (name on the base, file)
        self.users: dict[str, int] = {}  # file key → sessions holding it
        self.fused: tuple | None = None  # the blend fused into the weights, if any
        self.base_scheduler = self.pipe.scheduler
        self.token_rows = TokenRows(self.pipe)  # the tables' own rows of every token a session's embedding wrote
        self.trainer = None  # app_train.Trainer when the app trains: its adapters join the list
        self.holds = threading.Lock()  # for `users` alone: a new tab need not wait for a generation to end
        # what pages show is linked here: Gradio copies it into its cache under a content hash, so the
        # outputs folder itself is never served (its names are predictable; other users' images are there)
        self.shown_dir = tempfile.mkdtemp(prefix="loldu-shown-")
        weakref.finalize(self, shutil.rmtree, self.shown_dir, True)
        self._shown: dict[tuple[str, int], str] = {}  # (path, mtime) → its link
        self._shown_lock = threading.Lock()  # the Train tab's poll, the batch worker and the tabs' threads link and unlink
        self.preload, self.preload_errors = [], []  # loaded once, at start, for every session
        for p in preload:
            try:
                beside = embedding_beside(p)  # the bundled adapter's identifier embedding (pivotal tuning)
                held = [entry[-1] for entry in self.preload if entry[-1] is not None]
                emb = read_embedding(self.pipe, beside, held, "the preloaded adapters") if beside else None
                self.preload.append(self.acquire(p) + (p, emb))
            except (AdapterFileError, EmbeddingFileError, OSError) as e:  # e.g. an adapter of another base: the app starts without it
                self.preload_errors.append(f"{os.path.basename(p)} is not preloaded: {str(e).splitlines()[0]}")
        self.default_prompt = default_prompt or next(filter(None, map(_first_prompt, self.preload)), "")

    def new_session(self) -> "Session":
        s = Session(self)
        with self.holds:  # the preloaded files stay on the base (the studio holds them): no need for the base's lock
            for entry in self.preload:
                self.users[entry[0]] += 1  # the session's own hold; the studio keeps one for every later session
                s.attach_preloaded(entry)
        return s

    def servable(self, path: str) -> str:
        """A path Gradio may copy to a page: a link to `path` in this studio's private folder."""
        key = (path, os.stat(path).st_mtime_ns)  # the Train tab shows the same files every second
        with self._shown_lock:
            if key not in self._shown:
                link = os.path.join(tempfile.mkdtemp(dir=self.shown_dir), os.path.basename(path))
                try:
                    os.link(path, link)
                except OSError:  # another file system
                    shutil.copyfile(path, link)
                self._shown[key] = link
            return self._shown[key]

    def unserve(self, links) -> None:
        """Remove links no page will be sent again (Gradio has its own copy of what it showed)."""
        gone = {link for link in links if isinstance(link, str)}
        with self._shown_lock:
            for key in [k for k, link in self._shown.items() if link in gone]:
                shutil.rmtree(os.path.dirname(self._shown.pop(key)), ignore_errors=True)

    def folder_adapters(self) -> list[str]:
        return adapter_files(self.adapters_dir) + (self.trainer.trained() if self.trainer else [])

    def adapter_choices(self) -> list[tuple[str, str]]:
        """(label, path) for the list: a file's name, or the name of the run that trained it here."""
        trained = set(self.trainer.trained()) if self.trainer else set()
        return [(f"{os.path.basename(os.path.dirname(p))} (trained here)" if p in trained else os.path.basename(p), p)
                for p in self.folder_adapters()]

    # ---- the adapter files on the shared base ----------------------------------------------
    def acquire(self, path: str) -> tuple[str, str, AdapterFile]:
        """(key, name on the base, file): the file checked, and loaded onto the base once however
        many sessions use it. The base is untouched if the file is refused."""
        if not str(path).endswith(".safetensors"):
            raise AdapterFileError(f"{os.path.basename(path)}: only .safetensors adapter files are accepted")
        f = AdapterFile.read(path, max_bytes=MAX_UPLOAD_BYTES)
        if f.rank > MAX_RANK:
            raise AdapterFileError(f"{os.path.basename(path)}: rank {f.rank} is above the {MAX_RANK} this app serves on its shared base; "
                                   "generate with it through `loldu generate` or the library")
        key = f.sha256  # of the bytes checked and loaded: a file swapped on disk after the read is not this key
        with self.lock:
            if key not in self.on_base:
                name = adapter_name_for(path, {n for n, _ in self.on_base.values()})
                self._unfuse()
                load_adapter(self.pipe, f, adapter_name=name, weight=0.0)
                self.on_base[key] = (name, f)
            with self.holds:
                self.users[key] = self.users.get(key, 0) + 1
            return key, self.on_base[key][0], f

    def release(self, key: str) -> None:
        """A session let go of a file: the last one out removes it from the base."""
        with self.lock:
            with self.holds:
                self.users[key] -= 1
                last = self.users[key] == 0
                if last:
                    del self.users[key]
            if last:
                self._unfuse()
                delete_adapter(self.pipe, self.on_base.pop(key)[0])

    @torch.no_grad()
    def use_rows(self, rows: dict) -> None:
        """Under the lock: make the text encoders' embedding tables the base's plus exactly `rows`
        ((encoder, token id) → (token, row)); `use_rows({})` puts the base's tables back."""
        self.token_rows.use(rows)

    def _unfuse(self):
        if self.fused is not None:
            unfuse_loldu(self.pipe)
            self.fused = None

    def _activate(self, drawn: Drawn, fuse: bool) -> dict[str, float]:
        """Under the lock: make the base compute exactly this blend (nothing else's)."""
        blend = drawn.on_base
        wanted = tuple(sorted(blend.items())) if fuse and blend else None
        if self.fused != wanted:
            self._unfuse()
        if self.fused is None:
            set_adapter_weights(self.pipe, blend)
            if wanted:
                fuse_loldu(self.pipe)
                self.fused = wanted
        return blend


class Session:
    """One browser tab: its adapters, their weights and its results, over the shared base."""

    def __init__(self, studio: Studio):
        self.studio = studio
        self.loaded: dict[str, LoadedAdapter] = {}
        self.embeddings: dict[str, LoadedEmbedding] = {}  # file key → its rows
        self.history: list[tuple[object, str]] = []  # (image or PNG path, caption), newest first
        self.export_dir: str | None = None  # made at the first export, emptied at each
        self.last_drawn: Drawn | None = None  # what its latest images were drawn with: the status line says it
        self._dropped: list = []  # page links that left the history, unlinked at the next drop
        self.closed = False

    def __deepcopy__(self, memo):  # Gradio deep-copies state values: a copy would copy the shared base
        return self

    def _attach(self, path: str, f: AdapterFile, key: str, weight: float = 1.0, display_name: str | None = None,
                embedding: LoadedEmbedding | None = None):
        name = adapter_name_for(display_name or path, self.loaded)
        self.loaded[name] = LoadedAdapter(name, path, f, key, weight, embedding.key if embedding else None)
        return self.loaded[name]

    def attach_preloaded(self, entry) -> None:
        key, _, f, path, emb = entry
        self._attach(path, f, key, embedding=emb)
        if emb is not None:
            self.embeddings = {**self.embeddings, emb.key: emb}

    def add(self, path: str, weight: float = 1.0, display_name: str | None = None) -> LoadedAdapter:
        """Validate and load an adapter file for this session; refused files change nothing. A
        pivotal-tuning embedding beside it (the trainer's `learned_embeds.safetensors`) loads too."""
        return self._add(path, weight, display_name)[0]

    def _add(self, path: str, weight: float = 1.0, display_name: str | None = None, beside: bool = True):
        """(adapter, its embedding or None, what it replaced)."""
        if len(self.loaded) >= MAX_SLOTS:
            raise ValueError(f"at most {MAX_SLOTS} adapters at once; remove one first")
        beside = embedding_beside(path) if beside else None
        e = read_embedding(self.studio.pipe, beside, (), "") if beside else None  # checked before anything changes
        key, _, f = self.studio.acquire(path)
        gone = self._take_embedding(e, keep=key) if e is not None else []  # before naming: the name may be free again
        a = next((a for a in self.loaded.values() if a.key == key), None)
        if a is not None:  # the same file twice (or the preloaded one again) loads once
            self.studio.release(key)
            a.embedding = e.key if e is not None else a.embedding
        else:
            a = self._attach(path, f, key, weight, display_name, e)
        return a, e, gone

    def _take_embedding(self, e: LoadedEmbedding, keep: str | None = None) -> list[str]:
        """Add `e`. The session's embeddings that give one of its tokens other values go, with the
        adapters they came with (whose subject needs them; not the adapter file `keep` being
        loaded): one token has one row at a time, and the file loaded last is the one its user
        wants (a run just trained with the trigger `sks` beside the preloaded `sks` example).
        Returns what went. The dict is replaced, not changed: a generation may be reading it."""
        gone, embeddings = [], dict(self.embeddings)
        for other in [o for o in embeddings.values() if o.key != e.key and set(o.rows) & set(e.rows)]:
            del embeddings[other.key]
            came_with = [n for n, a in self.loaded.items() if a.embedding == other.key and a.key != keep]
            for n in came_with:
                self.remove(n)
            gone += came_with + [f"the {other.describe()}"]
        embeddings[e.key] = e
        self.embeddings = embeddings
        return gone

    def add_embedding(self, path: str) -> LoadedEmbedding:
        """Validate and load a token-embedding file (textual inversion / pivotal tuning) for this session."""
        return self._add_embedding(path)[0]

    def _add_embedding(self, path: str):
        e = read_embedding(self.studio.pipe, path, (), "")
        return e, self._take_embedding(e)

    def add_any(self, path: str, display_name: str | None = None, beside: bool = True) -> str:
        """Load an adapter or a token-embedding file, whichever it is; returns what was loaded (and
        replaced). `beside=False` (uploads): no embedding is taken from the adapter's folder, which
        for an upload is a shared cache other users' uploads land in."""
        if is_embedding_file(path):
            e, gone = self._add_embedding(path)
            said = f"loaded the {e.describe()}"
        else:
            a, e, gone = self._add(path, display_name=display_name, beside=beside)
            said = f"loaded {a.name}" + (f" with the {e.describe()}" if e is not None else "")
        return said + (f"; it replaces {' and '.join(gone)} (a token has one embedding at a time)" if gone else "")

    def token_rows(self) -> dict:
        """token id → (token, row) of this session's embeddings."""
        return _rows(self.embeddings.values())

    def remove(self, name: str) -> None:
        self.studio.release(self.loaded.pop(name).key)

    def clear(self) -> None:
        for n in list(self.loaded):
            self.remove(n)
        self.embeddings = {}

    def close(self) -> None:
        """The tab is gone: let go of its adapters and its export (Gradio calls this when it drops the state)."""
        if not self.closed:
            self.clear()
            self.clear_history()
            self._release([])
            if self.export_dir:
                shutil.rmtree(self.export_dir, ignore_errors=True)
            self.closed = True

    def set_weights(self, weights: dict[str, float]) -> float:
        """Re-weight this session's adapters; returns the seconds it took. The base's δ is
        recomputed at this session's next generation (milliseconds, no reload)."""
        t0 = time.perf_counter()
        for n, w in weights.items():
            w = float(w)
            if not -100 <= w <= 100:  # also NaN
                raise ValueError(f"the weight of {n} must be a number between -100 and 100")
            self.loaded[n].weight = w
        return time.perf_counter() - t0

    def _read(self):
        """(adapters [(name, key, weight)], embeddings, caption text), each read once: sliders move from other threads."""
        adapters = [(n, a.key, a.weight) for n, a in list(self.loaded.items()) if a.weight != 0]
        embeddings = list(self.embeddings.values())
        text = ", ".join(f"{n}:{w:g}" for n, _, w in adapters) or "no adapter"
        tokens = [t for e in embeddings for t in e.tokens()]
        return adapters, embeddings, text + (f" + embedding of {', '.join(tokens)}" if tokens else "")

    def drawn(self) -> Drawn:
        """What images drawn now would use; under the studio's lock (names on the base)."""
        adapters, embeddings, text = self._read()
        return Drawn(on_base={self.studio.on_base[k][0]: w for _, k, w in adapters}, shown={n: w for n, _, w in adapters},
                     text=text, embeddings=[e.path for e in embeddings],
                     rows=_rows(embeddings), embedding_keys=tuple(sorted(e.key for e in embeddings)))

    # ---- generation ---------------------------------------------------------------------
    def generate(self, prompt: str, negative_prompt: str = "", steps: int = 20, guidance: float = 4.0, seed: int = -1,
                 num_images: int = 1, size: int | None = None, compare: bool = False, fuse: bool = False, progress=None,
                 sampler: str = DEFAULT_SAMPLER):
        """[(image or PNG path, caption)] with this session's blend, and (compare) the base beside
        each; added to the session's history. PNGs carry their settings when the studio saves."""
        studio = self.studio
        size, seed, scheduler = self.check(prompt, size, seed, sampler)
        with studio.lock:
            try:
                drawn = self.last_drawn = self.drawn()
                studio._activate(drawn, fuse)
                studio.pipe.scheduler = scheduler
                studio.use_rows(drawn.rows)
                out = self._generate(prompt, negative_prompt, steps, guidance, seed, num_images, size, compare, progress, drawn, sampler)
            except BaseException:
                studio._unfuse()  # the next user gets the exact base back, whatever failed
                raise
            finally:
                studio.use_rows({})
                studio.pipe.scheduler = studio.base_scheduler
        self.remember(out)
        return out

    def remember(self, out: list) -> None:
        """Put results at the top of the history; what falls off it is no longer linked for pages."""
        if self.closed:  # the tab closed while its images were drawn: no page will show them (the PNGs stay in outputs)
            self.studio.unserve([image for image, _ in out])
            return
        self.history = out + self.history
        self._release(self.history[MAX_HISTORY:])
        del self.history[MAX_HISTORY:]

    def clear_history(self) -> None:
        self._release(self.history)
        self.history = []

    def _release(self, dropped: list) -> None:
        """Unlink what was dropped one round late: a gallery just returned may still be copied by Gradio."""
        self.studio.unserve(self._dropped)
        self._dropped = [image for image, _ in dropped]

    def check(self, prompt: str, size, seed, sampler: str):
        """(size, seed, scheduler) for a generation's settings; one-line ValueError if they are not usable."""
        studio = self.studio
        if not prompt.strip():
            raise ValueError("enter a prompt")
        size = int(size or studio.native)
        if size > studio.native:
            raise ValueError(f"size {size}: above the base model's native {studio.native} px the picture tiles; "
                             f"choose {studio.native} or less")
        if size < 8 or size % 8:
            raise ValueError(f"size {size}: must be a positive multiple of 8")
        if seed is None or (seed == seed and float(seed) < 0):
            seed = random.randint(0, 2**31 - 1)
        elif seed != seed or not float(seed).is_integer() or int(seed) > MAX_SEED:  # also NaN
            raise ValueError(f"the seed must be a whole number from 0 to {MAX_SEED} (or tick Random seed)")
        return size, int(seed), make_scheduler(sampler, studio.base_scheduler)

    def keep(self, image, seed: int, caption: str, drawn: Drawn | None, settings: dict):
        """(image, or the PNG written with its settings, caption) for the gallery; `drawn` None: the base alone."""
        if self.studio.outputs_dir is None:
            return image, caption
        from .io import save_png_with_settings

        settings = dict(settings, seed=seed, base=self.studio.base_path, adapters=drawn.shown if drawn else {},
                        embeddings=drawn.embeddings if drawn else [])
        return self.studio.servable(save_png_with_settings(image, self.studio.outputs_dir, seed, settings)), caption

    def _generate(self, prompt, negative_prompt, steps, guidance, seed, num_images, size, compare, progress, drawn, sampler):
        studio, pipe = self.studio, self.studio.pipe
        beside = compare and (drawn.on_base or drawn.rows)  # a base image beside each: something of this session is on
        total = num_images * (2 if beside else 1) * steps
        done = [0]

        def on_step(pipe, i, t, kw):
            done[0] += 1
            if progress is not None:
                progress(done[0] / total, desc=f"step {done[0]}/{total}")
            return kw

        def run(s):
            return pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=int(steps),
                        guidance_scale=float(guidance), generator=torch.Generator("cpu").manual_seed(s),
                        height=size, width=size, callback_on_step_end=on_step).images[0]

        png = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": int(steps), "guidance": float(guidance),
               "size": size, "sampler": sampler}  # seed, base, adapters, embeddings: set by keep
        out = []
        for i in range(int(num_images)):
            s = seed + i
            settings = f"seed {s} · {steps} steps · cfg {guidance:g} · {size}px · {sampler}"
            out.append(self.keep(run(s), s, f"{settings} · {drawn.text}", drawn, png))
            if beside:
                studio._unfuse()
                studio.use_rows({})
                with loldu_disabled(pipe):
                    out.append(self.keep(run(s), s, f"{settings} · base model", None, png))
                studio.use_rows(drawn.rows)
        return out

    def export_lora(self, fmt: str | None = None) -> str:
        """The active blend as a standard LoRA file; `fmt` defaults to the base's (kohya for a single file)."""
        from .export import default_format, export_lora

        if not any(a.weight for a in self.loaded.values()):
            raise ValueError("load an adapter (with a non-zero weight) to export")
        fmt = fmt or default_format(self.studio.base_path)
        # one folder per session, emptied at each export: clicks do not pile files up
        self.export_dir = self.export_dir or tempfile.mkdtemp(prefix="loldu-export-", dir=self.studio.shown_dir)
        for old in os.listdir(self.export_dir):
            os.unlink(os.path.join(self.export_dir, old))
        path = os.path.join(self.export_dir, f"blend_lora_{fmt}.safetensors")
        with self.studio.lock:
            self.studio._activate(self.drawn(), fuse=False)
            return export_lora(self.studio.pipe, path, fmt)


# ---- Gradio -------------------------------------------------------------------------------
def _one_line(e: Exception) -> str:
    """An error for the page's Markdown: its first line, printable, with Markdown's marks escaped (errors quote
    strangers' text, a file's metadata or name, which must not become a link or an image that the page loads)."""
    lines = str(e).strip("'\"").splitlines()
    text = lines[0] if lines and lines[0] else type(e).__name__
    text = "".join(c if c.isprintable() else " " for c in text)
    return re.sub(r"([\\`*_{}\[\]()#+!|<>~])", r"\\\1", text)


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    """'user:password' → ('user', 'password') for Gradio's login page; None → no login."""
    if auth is None:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must be USER:PASSWORD (both non-empty)")
    return user, password


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only "localhost" is known to stay on this machine
        return False


def build_ui(studio: Studio):
    import contextvars

    import gradio as gr

    from .app_batch import MAX_REQUESTS, Batcher, Request
    from .export import default_format, embedding_warning, format_warning

    from .schedulers import NAMES as SAMPLERS

    def slot_updates(session):
        names = list(session.loaded)
        ups = []
        for i in range(MAX_SLOTS):
            if i < len(names):
                a = session.loaded[names[i]]
                ups += [gr.update(visible=True), gr.update(value=a.describe()), gr.update(value=a.weight, label=f"weight of {a.name}")]
            else:
                ups += [gr.update(visible=False), gr.update(value=""), gr.update(value=1.0)]
        return ups

    def add_files(session, paths, uploads):
        msgs, trained = [], set(studio.trainer.trained()) if studio.trainer else set()
        picked = [(p, True) for p in paths or []] + [(getattr(u, "name", u), False) for u in uploads or []]
        for p, from_folder in picked:  # an upload's folder is Gradio's cache, shared with every other user's uploads
            try:  # a run trained here is named by its folder (its file is always loldu_adapter.safetensors)
                msgs.append(session.add_any(p, display_name=os.path.basename(os.path.dirname(p)) if p in trained else None,
                                            beside=from_folder))
            except Exception as e:  # noqa: BLE001 — whatever a stranger's file does, it is one line here
                msgs.append(f"**error:** {_one_line(e)}")
        return ["<br>".join(msgs) or "nothing selected"] + slot_updates(session)

    def clear(session):
        session.clear()
        return ["all adapters removed"] + slot_updates(session)

    def reweight(session, *ws):
        names = list(session.loaded)
        try:
            secs = session.set_weights({n: w for n, w in zip(names, ws)})
        except ValueError as e:
            return f"**error:** {_one_line(e)}"
        return f"weights set in {secs * 1000:.1f} ms (no reload)"

    def generate(session, prompt, negative, sampler, steps, guidance, seed, random_seed, n, size, compare, fuse,
                 progress=gr.Progress()):
        seed = -1 if random_seed else seed
        try:
            if seed is None:  # an emptied box
                raise ValueError("enter a seed (or tick Random seed)")
            if fuse:  # a fused base serves one blend: this request alone
                session.generate(prompt, negative, int(steps), float(guidance), seed, int(n), int(size), compare, fuse,
                                 progress=progress, sampler=sampler)
            else:  # batched with whatever other pages asked meanwhile, each with its own adapters
                ctx = contextvars.copy_context()  # Gradio's progress bar finds its page through context variables
                report = lambda frac, desc: ctx.run(progress, frac, desc=desc)  # noqa: E731
                batcher.submit(Request(session, prompt, negative, int(steps), float(guidance), seed, int(n), int(size), compare,
                                       sampler, progress=report))
        except Exception as e:  # noqa: BLE001 — the base has been restored
            return session.history, f"**error:** {_one_line(e)}"
        saved = f" · saved with their settings in `{studio.outputs_dir}`" if studio.outputs_dir else ""
        return session.history, f"done: {session.last_drawn.text}{saved}"

    def clear_history(session):
        session.clear_history()
        return [], "history cleared (saved files are kept)"

    def export(session, fmt):
        try:
            path = session.export_lora(fmt)
        except Exception as e:  # noqa: BLE001
            return None, f"**error:** {_one_line(e)}"
        warnings = [w for w in [format_warning(fmt)] if w] + [embedding_warning(f"the {e.describe()}") for e in session.embeddings.values()]
        return path, f"exported the active blend as a {fmt} LoRA" + "".join(f" · **warning:** {w}" for w in warnings)

    # what a fresh page shows: the preloaded adapters of a new session (not a held one)
    first = Session(studio)
    for entry in studio.preload:
        first.attach_preloaded(entry)
    first_names = list(first.loaded)
    batcher = Batcher(studio)  # one worker: concurrent pages' requests are generated together
    sampler_info = f"default: the base's own ({type(studio.base_scheduler).__name__})"

    # Gradio's copies of uploads and shown images: deleted hourly once a day old
    with gr.Blocks(title="loldu-diffusion", delete_cache=(3600, 86400)) as demo:
        # one Session per browser tab; a function (not a value) so that each tab gets its own
        session = gr.State(lambda: studio.new_session(), delete_callback=lambda s: s.close())
        gr.Markdown(f"# loldu-diffusion\nBase model: `{studio.base_path}` ({studio.native} px). "
                    "Adapters are a few kilobytes: load, blend, generate. Your adapters and results are yours: "
                    "other tabs and users do not see them."
                    + "".join(f"\n\n**warning:** {problem}" for problem in studio.preload_errors))
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="Prompt", value=studio.default_prompt, elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", value="")
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    status = gr.Markdown("", elem_id="status")
                    with gr.Accordion("Adapters", open=True):
                        slots = []
                        for i in range(MAX_SLOTS):
                            a = first.loaded[first_names[i]] if i < len(first_names) else None
                            with gr.Group(visible=a is not None) as box:
                                info = gr.Markdown(a.describe() if a else "")
                                w = gr.Slider(-2, 2, value=1.0, step=0.05, label=f"weight of {a.name}" if a else "weight",
                                              elem_id=f"weight-{i}")
                            slots.append((box, info, w))
                        with gr.Row():
                            folder = gr.Dropdown(choices=studio.adapter_choices(),
                                                 multiselect=True, label="From the adapters folder", elem_id="folder")
                            upload = gr.File(file_count="multiple", file_types=[".safetensors"], label="Upload .safetensors",
                                             elem_id="upload")
                        with gr.Row():
                            add = gr.Button("Load selected / uploaded", elem_id="load")
                            clear_btn = gr.Button("Remove all")
                        adapter_status = gr.Markdown("", elem_id="adapter-status")
                    with gr.Accordion("Settings", open=True):
                        with gr.Row():
                            sampler = gr.Dropdown(list(SAMPLERS), value=SAMPLERS[0], label="Sampler", info=sampler_info,
                                                  elem_id="sampler")
                            steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                            guidance = gr.Slider(0, 15, value=4.0, step=0.5, label="Guidance")
                        with gr.Row():
                            seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                            random_seed = gr.Checkbox(value=False, label="Random seed")
                        with gr.Row():
                            n = gr.Slider(1, 8, value=2, step=1, label="Images", elem_id="num-images")
                            # no larger sizes: a base tiles its picture above its native size
                            size = gr.Slider(max(8, studio.native // 2), studio.native, value=studio.native, step=8,
                                             label=f"Size (up to the base's native {studio.native} px)")
                        with gr.Row():
                            compare = gr.Checkbox(value=True, label="Side by side with the base model", elem_id="compare")
                            fuse = gr.Checkbox(value=False, label="Fuse for speed")
                with gr.Column(scale=1):
                    gallery = gr.Gallery(label="Results (this session, newest first)", columns=2, elem_id="gallery")
                    clear_hist = gr.Button("Clear history")
                    with gr.Accordion("Export", open=False):
                        fmt = gr.Radio(list(EXPORT_FORMATS), value=default_format(studio.base_path), label="Export format")
                        export_btn = gr.Button("Export the blend as a standard LoRA")
                        exported = gr.File(label="LoRA file")
        slot_outputs = [c for s in slots for c in s]
        add.click(add_files, [session, folder, upload], [adapter_status] + slot_outputs)
        clear_btn.click(clear, session, [adapter_status] + slot_outputs)
        weights = [s[2] for s in slots]
        for w in weights:
            w.release(reweight, [session] + weights, adapter_status)
        # up to MAX_REQUESTS pages wait in the batcher at once (the queue's default is one event at a time)
        go.click(generate, [session, prompt, negative, sampler, steps, guidance, seed, random_seed, n, size, compare, fuse],
                 [gallery, status], concurrency_limit=MAX_REQUESTS)
        clear_hist.click(clear_history, session, [gallery, status])
        export_btn.click(export, [session, fmt], [exported, adapter_status])
        if studio.trainer is not None:
            from .app_train import build_train_tab

            with gr.Tab("Train"):
                build_train_tab(studio, session, folder, [adapter_status] + slot_outputs, slot_updates)
        # the list as it is now (runs trained since the app started included) on every page load
        demo.load(lambda: gr.update(choices=studio.adapter_choices()), None, folder)
    return demo


def _trainer(base, outputs: str, train_args: str | None):
    """The Train tab's trainer, its extra arguments checked by the trainer's own parser."""
    import shlex

    from .app_train import Trainer
    from .assets import default_base_path

    trainer = Trainer(base or default_base_path(), os.path.join(outputs, "trained"), shlex.split(train_args or ""))
    trainer.defaults()
    return trainer


def launch(base=None, adapters_dir=None, host="127.0.0.1", port=7860, block=True, auth: str | None = None,
           preload=None, outputs: str | None = None, train_args: str | None = None, compile: bool = False):
    import sys

    from .quiet import quiet_libraries
    from .assets import ASSETS

    credentials = parse_auth(auth)
    if adapters_dir is not None and not os.path.isdir(adapters_dir):
        raise ValueError(f"--adapters {adapters_dir}: no such folder")
    if credentials is None and not is_loopback(host):
        print(f"warning: serving on {host} without --auth USER:PASSWORD: anyone who can reach port {port} can use "
              "this app (and this machine's compute)", file=sys.stderr, flush=True)
    quiet_libraries()
    embedded = base is None
    outputs = os.path.abspath(outputs or DEFAULT_OUTPUTS)
    trainer = _trainer(base, outputs, train_args)  # a mistyped --train-args is one line now, not after the base loads
    adapters_dir = adapters_dir or (os.path.join(ASSETS, "adapters") if embedded else None)
    if preload is None:  # the bundled example is made for the embedded base only
        preload = adapter_files(os.path.join(ASSETS, "adapters")) if embedded else []
    studio = Studio(base, adapters_dir, preload=sorted(preload), outputs_dir=outputs, compile=compile)
    studio.trainer = trainer
    if embedded and not studio.default_prompt:  # the bundled adapter could not be preloaded: a first click still draws
        from .assets import DEFAULT_CLASS_PROMPT

        studio.default_prompt = DEFAULT_CLASS_PROMPT
    for problem in studio.preload_errors:
        print(f"warning: {problem}", file=sys.stderr, flush=True)
    demo = build_ui(studio)
    demo.queue(default_concurrency_limit=1)
    # quiet: Gradio's start-up lines end with a share=True hint that a local tool does not need;
    # the address is the one line people do need
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, max_file_size=MAX_UPLOAD_BYTES, quiet=True,
                auth=credentials)  # no allowed_paths: pages get copies (Studio.servable), never the outputs folder
    print(f"loldu app: open {demo.local_url} in a browser (Ctrl+C stops it); results are saved in {outputs}", flush=True)
    if block:
        demo.block_thread()
    return demo
