"""The web app: one base model loaded once; kilobyte adapters listed, uploaded, blended.

`Studio` holds the state and does the work (tested directly); `build_ui` wires it to Gradio.
Switching or re-weighting adapters only recomputes each layer's blended δ: the base is never
reloaded, so it takes milliseconds.

The base is shared by everyone using the app, so no error may leave it changed: loading is
all or nothing, and a failed generation unfuses (which restores the exact base weights).
"""
from __future__ import annotations

import os
import random
import tempfile
import time
from dataclasses import dataclass

import torch

from .adapter_file import AdapterFile, AdapterFileError, load_adapter
from .model import delete_adapter, fuse_loldu, loldu_disabled, set_adapter_weights, unfuse_loldu
from .pipeline import adapter_name_for, load_base

MAX_SLOTS = 6
MAX_UPLOAD_BYTES = 16 * 2**20


@dataclass
class LoadedAdapter:
    name: str
    path: str
    file: AdapterFile
    weight: float = 1.0

    def describe(self) -> str:
        m = self.file.metadata
        trigger = m.get("instance_prompt") or "—"
        layers = ", ".join(f"{c} {len(r)}" for c, r in self.file.layers.items())
        return (f"**{self.name}** · trigger `{trigger}` · rank {self.file.rank} · layers {layers} · "
                f"{self.file.num_parameters:,} values · {self.file.nbytes:,} bytes · base {m.get('base_model') or '?'}")


class Studio:
    def __init__(self, base: str | None = None, adapters_dir: str | None = None, device: str | None = None):
        self.pipe = load_base(base, device=device)
        self.base_path = self.pipe._loldu_base_path
        self.adapters_dir = adapters_dir
        self.loaded: dict[str, LoadedAdapter] = {}
        self.fused = False
        self.native = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    # ---- adapters -----------------------------------------------------------------------
    def folder_adapters(self) -> list[str]:
        d = self.adapters_dir
        if not d or not os.path.isdir(d):
            return []
        return sorted(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".safetensors"))

    def add(self, path: str, weight: float = 1.0, display_name: str | None = None) -> LoadedAdapter:
        """Validate and load an adapter file; the model is untouched if it is refused."""
        if len(self.loaded) >= MAX_SLOTS:
            raise ValueError(f"at most {MAX_SLOTS} adapters at once; remove one first")
        if not str(path).endswith(".safetensors"):
            raise AdapterFileError(f"{os.path.basename(path)}: only .safetensors adapter files are accepted")
        f = AdapterFile.read(path, max_bytes=MAX_UPLOAD_BYTES)
        for a in self.loaded.values():
            if os.path.abspath(a.path) == os.path.abspath(path):
                return a
        name = adapter_name_for(display_name or path, self.loaded)
        self._unfuse()
        load_adapter(self.pipe, f, adapter_name=name, weight=weight)
        self.loaded[name] = LoadedAdapter(name, path, f, weight)
        return self.loaded[name]

    def remove(self, name: str) -> None:
        self._unfuse()
        delete_adapter(self.pipe, name)
        self.loaded.pop(name, None)

    def set_weights(self, weights: dict[str, float]) -> float:
        """Re-weight the loaded adapters; returns the seconds it took (no reload, δ only)."""
        t0 = time.perf_counter()
        self._unfuse()
        for n, w in weights.items():
            self.loaded[n].weight = float(w)
        set_adapter_weights(self.pipe, {n: a.weight for n, a in self.loaded.items()})
        return time.perf_counter() - t0

    def _unfuse(self):
        if self.fused:
            unfuse_loldu(self.pipe)
            self.fused = False

    # ---- generation ---------------------------------------------------------------------
    def generate(self, prompt: str, negative_prompt: str = "", steps: int = 20, guidance: float = 4.0, seed: int = -1,
                 num_images: int = 1, size: int | None = None, compare: bool = False, fuse: bool = False, progress=None):
        """[(image, caption)]: with the active adapters, and (compare) the base beside each."""
        if not prompt.strip():
            raise ValueError("enter a prompt")
        size = int(size or self.native)
        seed = random.randint(0, 2**31 - 1) if seed is None or int(seed) < 0 else int(seed)
        active = {n: a.weight for n, a in self.loaded.items() if a.weight != 0}
        if fuse and active and not self.fused:
            fuse_loldu(self.pipe)
            self.fused = True
        elif not fuse:
            self._unfuse()
        try:
            return self._generate(prompt, negative_prompt, steps, guidance, seed, num_images, size, compare, progress, active)
        except BaseException:
            self._unfuse()  # the next user gets the exact base back, whatever failed
            raise

    def _generate(self, prompt, negative_prompt, steps, guidance, seed, num_images, size, compare, progress, active):
        total = num_images * (2 if compare and active else 1) * steps
        done = [0]

        def on_step(pipe, i, t, kw):
            done[0] += 1
            if progress is not None:
                progress(done[0] / total, desc=f"step {done[0]}/{total}")
            return kw

        def run(s):
            return self.pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=int(steps),
                             guidance_scale=float(guidance), generator=torch.Generator("cpu").manual_seed(s),
                             height=size, width=size, callback_on_step_end=on_step).images[0]

        blend = ", ".join(f"{n}:{w:g}" for n, w in active.items()) or "no adapter"
        out = []
        for i in range(int(num_images)):
            s = seed + i
            settings = f"seed {s} · {steps} steps · cfg {guidance:g} · {size}px"
            out.append((run(s), f"{settings} · {blend}"))
            if compare and active:
                if self.fused:
                    self._unfuse()
                with loldu_disabled(self.pipe):
                    out.append((run(s), f"{settings} · base model"))
        return out

    def export_lora(self, fmt: str = "diffusers") -> str:
        from .export import export_lora

        if not any(a.weight for a in self.loaded.values()):
            raise ValueError("load an adapter (with a non-zero weight) to export")
        self._unfuse()
        path = os.path.join(tempfile.mkdtemp(prefix="loldu-export-"), f"blend_lora_{fmt}.safetensors")
        return export_lora(self.pipe, path, fmt)


# ---- Gradio -------------------------------------------------------------------------------
def _one_line(e: Exception) -> str:
    lines = str(e).strip("'\"").splitlines()
    return lines[0] if lines and lines[0] else type(e).__name__


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
    import gradio as gr

    def slot_updates():
        names = list(studio.loaded)
        ups = []
        for i in range(MAX_SLOTS):
            if i < len(names):
                a = studio.loaded[names[i]]
                ups += [gr.update(visible=True), gr.update(value=a.describe()), gr.update(value=a.weight, label=f"weight of {a.name}")]
            else:
                ups += [gr.update(visible=False), gr.update(value=""), gr.update(value=1.0)]
        return ups

    def add_files(paths, uploads):
        msgs = []
        for p in list(paths or []) + [getattr(u, "name", u) for u in (uploads or [])]:
            try:
                a = studio.add(p)
                msgs.append(f"loaded {a.name}")
            except Exception as e:  # noqa: BLE001 — whatever a stranger's file does, it is one line here
                msgs.append(f"**error:** {_one_line(e)}")
        return ["<br>".join(msgs) or "nothing selected"] + slot_updates()

    def clear():
        for n in list(studio.loaded):
            studio.remove(n)
        return ["all adapters removed"] + slot_updates()

    def reweight(*ws):
        names = list(studio.loaded)
        secs = studio.set_weights({n: w for n, w in zip(names, ws)})
        return f"weights set in {secs * 1000:.1f} ms (no reload)"

    def generate(prompt, negative, steps, guidance, seed, random_seed, n, size, compare, fuse, progress=gr.Progress()):
        try:
            return studio.generate(prompt, negative, int(steps), float(guidance), -1 if random_seed else int(seed), int(n),
                                   int(size), compare, fuse, progress=progress), "done"
        except Exception as e:  # noqa: BLE001 — Studio.generate has restored the base
            return [], f"**error:** {_one_line(e)}"

    def export(fmt):
        try:
            return studio.export_lora(fmt), f"exported the active blend as a {fmt} LoRA"
        except Exception as e:  # noqa: BLE001
            return None, f"**error:** {_one_line(e)}"

    with gr.Blocks(title="loldu-diffusion") as demo:
        gr.Markdown(f"# loldu-diffusion\nBase model: `{studio.base_path}`. Adapters are a few kilobytes: load, blend, generate.")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", value="a photo of sks heart on a olive background", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", value="")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                    guidance = gr.Slider(0, 15, value=4.0, step=0.5, label="Guidance")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    random_seed = gr.Checkbox(value=False, label="Random seed")
                with gr.Row():
                    n = gr.Slider(1, 8, value=2, step=1, label="Images")
                    size = gr.Slider(studio.native // 2, studio.native * 2, value=studio.native, step=8, label="Size")
                with gr.Row():
                    compare = gr.Checkbox(value=True, label="Side by side with the base model")
                    fuse = gr.Checkbox(value=False, label="Fuse for speed")
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown("", elem_id="status")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Results", columns=2, elem_id="gallery", type="pil")
        with gr.Accordion("Adapters", open=True):
            with gr.Row():
                folder = gr.Dropdown(choices=[(os.path.basename(p), p) for p in studio.folder_adapters()], multiselect=True, label="From the adapters folder", elem_id="folder")
                upload = gr.File(file_count="multiple", file_types=[".safetensors"], label="Upload .safetensors", elem_id="upload")
            with gr.Row():
                add = gr.Button("Load selected / uploaded", elem_id="load")
                clear_btn = gr.Button("Remove all")
            adapter_status = gr.Markdown("", elem_id="adapter-status")
            slots = []
            for i in range(MAX_SLOTS):
                with gr.Group(visible=False) as box:
                    info = gr.Markdown("")
                    w = gr.Slider(-2, 2, value=1.0, step=0.05, label="weight", elem_id=f"weight-{i}")
                slots.append((box, info, w))
            with gr.Row():
                fmt = gr.Radio(["diffusers", "kohya"], value="diffusers", label="Export format")
                export_btn = gr.Button("Export the blend as a standard LoRA")
            exported = gr.File(label="LoRA file")
        slot_outputs = [c for s in slots for c in s]
        add.click(add_files, [folder, upload], [adapter_status] + slot_outputs)
        clear_btn.click(clear, None, [adapter_status] + slot_outputs)
        weights = [s[2] for s in slots]
        for w in weights:
            w.release(reweight, weights, adapter_status)
        go.click(generate, [prompt, negative, steps, guidance, seed, random_seed, n, size, compare, fuse], [gallery, status])
        export_btn.click(export, fmt, [exported, adapter_status])
    return demo


def launch(base=None, adapters_dir=None, host="127.0.0.1", port=7860, block=True, auth: str | None = None):
    import sys

    from .quiet import quiet_libraries
    from .toy import ASSETS

    credentials = parse_auth(auth)
    if credentials is None and not is_loopback(host):
        print(f"warning: serving on {host} without --auth USER:PASSWORD: anyone who can reach port {port} can use "
              "this app (and this machine's compute)", file=sys.stderr, flush=True)
    quiet_libraries()
    studio = Studio(base, adapters_dir or (os.path.join(ASSETS, "adapters") if base is None else None))
    demo = build_ui(studio)
    demo.queue(default_concurrency_limit=1)
    # quiet: Gradio's start-up lines end with a share=True hint that a local tool does not need;
    # the address is the one line people do need
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, max_file_size=MAX_UPLOAD_BYTES, quiet=True,
                auth=credentials)
    print(f"loldu app: open {demo.local_url} in a browser (Ctrl+C stops it)", flush=True)
    if block:
        demo.block_thread()
    return demo
