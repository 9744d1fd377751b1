"""What a training run leaves for people: image grids, a loss curve, a model card."""
from __future__ import annotations

import json
import os

from PIL import Image

from ..assets import default_base_path
from ..embeddings import EMBEDDINGS_FILE
from ..io import atomic_write, atomic_write_text
from ..single_file import is_single_file


def size_of(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def save_grid(rows: list[list[Image.Image]], path: str, min_cell: int = 128, labels: list[str] | None = None) -> str:
    """Rows of images → one PNG (small images are enlarged, pixel-exact, to be visible); with
    `labels`, a column at the left names each row ("before", "step 200", "after")."""
    w, h = rows[0][0].size
    scale = max(1, min_cell // max(w, h))
    cols = max(len(r) for r in rows)
    left = _label_width(labels) if labels else 0
    grid = Image.new("RGB", (left + cols * w * scale, len(rows) * h * scale), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im.resize((w * scale, h * scale), Image.NEAREST), (left + x * w * scale, y * h * scale))
    if labels:
        _draw_labels(grid, labels, h * scale)
    return atomic_write(path, grid.save, ".png")


LABEL_FONT_PX = 14
LABEL_PAD = 8


def _font():
    from PIL import ImageFont

    return ImageFont.load_default(size=LABEL_FONT_PX)  # Pillow's bundled font: no system fonts needed


def _label_width(labels: list[str]) -> int:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return 2 * LABEL_PAD + max(int(draw.textlength(t, font=_font())) for t in labels)


def _draw_labels(grid: Image.Image, labels: list[str], row_height: int) -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(grid)
    for y, text in enumerate(labels):
        draw.text((LABEL_PAD, y * row_height + row_height // 2), text, fill=(0, 0, 0), font=_font(), anchor="lm")


def write_images(out_dir, before, during, after) -> dict:
    """The validation grids there are images for (a failed validation leaves its row out)."""
    grids = {}
    if after:
        grids["after"] = save_grid([after], os.path.join(out_dir, "validation_after.png"))
    if before:
        grids["before"] = save_grid([before], os.path.join(out_dir, "validation_before.png"))
        rows = [before] + [imgs for _, imgs in during] + ([after] if after else [])
        labels = ["before"] + [f"step {step}" for step, _ in during] + (["after"] if after else [])
        if len(rows) > 1:
            grids["progress"] = save_grid(rows, os.path.join(out_dir, "validation_grid.png"), labels=labels)
    return grids


def log_images(accelerator, tag, images, step):
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            arr = np.stack([np.asarray(im) for im in images])
            tracker.writer.add_images(tag, arr, step, dataformats="NHWC")


def smoothed(history: list[float], span: int | None = None) -> list[float]:
    """Exponential moving average, debiased as TensorBoard's smoothing is (the first values are
    not pulled towards 0). A diffusion loss depends mostly on each step's random timestep, so the
    raw curve looks flat; the average shows the trend. Default span: a tenth of the run."""
    span = span or max(5, len(history) // 10)
    beta = 1 - 2 / (span + 1)
    out, avg = [], 0.0
    for i, x in enumerate(history, 1):
        avg = beta * avg + (1 - beta) * x
        out.append(avg / (1 - beta**i))
    return out


def loss_curve(history: list[float], path: str) -> str | None:
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    span = max(5, len(history) // 10)
    steps = range(1, len(history) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(steps, history, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss per step")
    ax.plot(steps, smoothed(history, span), color="tab:blue", linewidth=2, label=f"smoothed (EMA, span {span})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100), ".png")
    finally:
        plt.close(fig)


def write_json(path: str, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


MAX_CARD_INSTANCES = 10


def save_instance_images(folder: str, size: int, path: str) -> str | None:
    """The instance images (up to 10, centre-cropped to the training size) in one row: the model
    card puts them beside the before/after validation images, so a reader sees what was taught."""
    from PIL import ImageOps

    from ..images import read_images

    try:
        images, _ = read_images(folder)
    except ValueError:  # the folder is gone since training started: the card goes without them
        return None
    if not images:
        return None
    row = [ImageOps.fit(im, (size, size), Image.BICUBIC) for _, im in images[:MAX_CARD_INSTANCES]]
    return save_grid([row], path)


def _comparison_table(instances: str | None, grids: dict) -> list[str]:
    cells = [(name, path) for name, path in (("instance images", instances), ("before", grids.get("before")),
                                             ("after", grids.get("after"))) if path]
    if len(cells) < 2:
        return []
    return ["| " + " | ".join(n for n, _ in cells) + " |", "|" + "---|" * len(cells),
            "| " + " | ".join(f"![{n}]({os.path.basename(p)})" for n, p in cells) + " |", ""]


def model_card(args, summary: dict, grids: dict) -> str:
    """README.md with YAML front matter, as diffusers' DreamBooth scripts write."""
    base = args.pretrained_model_name_or_path
    if os.path.isdir(base) and os.path.samefile(base, default_base_path()):
        base = "assets/tiny-sd"  # the embedded base, as the repository names it
    out = summary["outputs"][0]
    loader = "from_single_file" if is_single_file(base) else "from_pretrained"
    tags = ["text-to-image", "diffusers", "dreambooth", args.method, "loldu-diffusion"]
    pivotal = bool(getattr(args, "train_text_encoder_ti", False))  # the identifier's embedding is an output too
    embedding = f"load_token_embeddings(pipe, {EMBEDDINGS_FILE!r})  # the identifier's trained embedding (pivotal tuning)\n"
    load = {
        "loldu": (
            "from diffusers import StableDiffusionPipeline\n"
            f"from loldu_diffusion import load_adapter{', load_token_embeddings' if pivotal else ''}\n\n"
            f"pipe = StableDiffusionPipeline.{loader}({base!r})\n"
            f"load_adapter(pipe, {out!r}, weight=1.0)\n"
            + (embedding if pivotal else "")
            + f"image = pipe({args.instance_prompt!r}).images[0]\n"
        ),
        "lora": f"pipe = StableDiffusionPipeline.{loader}({base!r})\npipe.load_lora_weights({args.output_dir!r})\n",
        "full": f"from diffusers import UNet2DConditionModel\nunet = UNet2DConditionModel.from_pretrained({args.output_dir!r}, subfolder='unet')\n"
                f"pipe = StableDiffusionPipeline.{loader}({base!r}, unet=unet)\n",
        # diffusers' load_textual_inversion refuses a token the tokenizer has ('sks'): the row is written in place
        "ti": f"from loldu_diffusion import load_token_embeddings\n\npipe = StableDiffusionPipeline.{loader}({base!r})\n"
              f"load_token_embeddings(pipe, {os.path.join(args.output_dir, out)!r})  # the identifier's trained embedding\n",
        "peft": f"# a PEFT {args.method} state dict for the UNet's {', '.join(args.unet_targets)}: load it with\n"
                f"# loldu_diffusion.training.methods.PeftVectorMethod(args).load_output(pipe, {args.output_dir!r})\n",
    }[{"olora": "lora", "vera": "peft", "ia3": "peft"}.get(args.method, args.method)]
    if pivotal and args.method != "loldu":
        load += "from loldu_diffusion import load_token_embeddings\n" + embedding
    front = ["---", f"base_model: {base}", f"instance_prompt: {json.dumps(args.instance_prompt)}", "license: openrail++", "tags:"]
    front += [f"- {t}" for t in tags] + ["inference: true", "---"]
    body = [
        f"# {args.method.upper()} DreamBooth: `{args.instance_prompt}`",
        "",
        f"Trained with loldu-diffusion on **{base}** for {summary['steps']} steps "
        f"({summary['trainable_parameters']:,} trainable values; output {summary['output_bytes']:,} bytes).",
        "",
        f"- instance prompt: `{args.instance_prompt}`" + (f"; class prompt: `{args.class_prompt}`" if args.class_prompt else ""),
        f"- method {args.method}, rank {args.rank}, learning rate {args.learning_rate}, batch {args.train_batch_size}, "
        f"resolution {summary['resolution']}, seed {args.seed}",
        f"- prior preservation: {'yes' if args.with_prior_preservation else 'no'}; text encoder trained: {'yes' if args.train_text_encoder else 'no'}; "
        f"identifier embedding trained (pivotal tuning): {'yes' if pivotal else 'no'}; "
        f"lr schedule: {getattr(args, 'lr_scheduler', None) or 'constant'}",
        "",
        "## Validation",
        "",
    ]
    instances = save_instance_images(args.instance_data_dir, summary["resolution"],
                                     os.path.join(args.output_dir, "instance_images.png"))
    table = _comparison_table(instances, grids)
    body += table
    if "progress" in grids:
        body += ["Validation images along the run (rows: before, the validation steps, after):", "",
                 f"![progress]({os.path.basename(grids['progress'])})", ""]
    if not table:  # one image of the three: no comparison to show, just the images there are
        body += [f"{name}: ![{name}]({os.path.basename(path)})\n" for name, path in grids.items() if name != "progress"]
    body += ["## Use it", "", "```python", load.rstrip(), "```", ""]
    if args.method == "loldu":
        body += ["Other tools (A1111, ComfyUI, kohya) load it as a standard LoRA after "
                 f"`loldu export-lora {out} --base {base} --format kohya -o {out.replace('.safetensors', '_kohya.safetensors')}`.", ""]
    return atomic_write_text(os.path.join(args.output_dir, "README.md"), "\n".join(front + [""] + body))
