"""The `loldu` command line: inspect, blend, export-lora, fuse, generate, eval, app, bench."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _inspect(args) -> int:
    from .adapter_file import AdapterFile

    f = AdapterFile.read(args.file)
    info = {
        "file": args.file,
        "bytes": f.nbytes,
        "rank": f.rank,
        "layers": {c: len(rows) for c, rows in f.layers.items()},
        "num_layers": f.num_layers,
        "parameters": f.num_parameters,
        "metadata": {k: v for k, v in f.metadata.items() if k != "layers"},
    }
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{args.file}: LoLDU adapter, {f.nbytes:,} bytes")
    print(f"  rank {f.rank}, {f.num_layers} layers ({', '.join(f'{c}: {n}' for c, n in info['layers'].items())}), {f.num_parameters:,} values")
    for k, v in info["metadata"].items():
        print(f"  {k}: {json.dumps(v) if not isinstance(v, str) else v}")
    return 0


def _blend(args) -> int:
    from .pipeline import blend_files

    f = blend_files(args.adapters)
    f.save(args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}: blend of {len(args.adapters)} adapters, rank {f.rank}, {os.path.getsize(args.output):,} bytes")
    return 0


def _export_lora(args) -> int:
    from .export import export_lora
    from .pipeline import load_adapter_specs, load_base

    pipe = load_base(args.base)
    load_adapter_specs(pipe, args.adapters)
    export_lora(pipe, args.output, args.format, overwrite=args.overwrite)
    print(f"wrote {args.output} ({args.format} LoRA, {os.path.getsize(args.output):,} bytes)")
    if args.format == "diffusers":
        print("note: diffusers' load_lora_weights reads this file; for A1111, ComfyUI or kohya export with --format kohya "
              "(ComfyUI skips every UNet layer of a diffusers-format file, with only a log warning)")
    return 0


def _fuse(args) -> int:
    from .io import atomic_save_dir, refuse_existing
    from .model import fuse_loldu, remove_loldu
    from .pipeline import load_adapter_specs, load_base

    refuse_existing(args.output, args.overwrite)
    pipe = load_base(args.base)
    load_adapter_specs(pipe, args.adapters)
    fuse_loldu(pipe)
    remove_loldu(pipe, keep_fused=True)
    atomic_save_dir(pipe.save_pretrained, args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}: {os.path.basename(os.path.normpath(pipe._loldu_base_path))} with {', '.join(args.adapters)} fused in")
    return 0


def _generate(args) -> int:
    import torch
    from PIL.PngImagePlugin import PngInfo
    from tqdm.auto import tqdm

    from .pipeline import load_adapter_specs, load_base

    pipe = load_base(args.base, device=args.device)
    weights = load_adapter_specs(pipe, args.adapter or [])
    os.makedirs(args.output, exist_ok=True)
    size = args.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    written = []
    for i in tqdm(range(args.num_images), desc="generating"):
        seed = args.seed + i
        image = pipe(args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                     generator=torch.Generator("cpu").manual_seed(seed), height=size, width=size).images[0]
        settings = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": seed, "steps": args.steps,
                    "guidance": args.guidance, "size": size, "base": pipe._loldu_base_path, "adapters": weights}
        info = PngInfo()
        info.add_text("parameters", json.dumps(settings))
        k = 0
        while os.path.exists(path := os.path.join(args.output, f"{k:04d}_seed{seed}.png")):
            k += 1  # never overwrite an earlier image
        image.save(path + ".tmp.png", pnginfo=info)
        os.replace(path + ".tmp.png", path)
        written.append(path)
    print(f"wrote {len(written)} image(s) to {args.output}")
    return 0


def _eval(args) -> int:
    from .metrics import dreambooth_metrics

    result = dreambooth_metrics(args.images, args.reference, args.prompt, clip_path=args.clip, dino_path=args.dino)
    print(json.dumps(result) if args.json else "\n".join(f"{k:>7}: {v:.4f}" for k, v in result.items() if isinstance(v, float)))
    return 0


def _app(args) -> int:
    from .app import launch

    launch(base=args.base, adapters_dir=args.adapters, host=args.host, port=args.port)
    return 0


def _bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loldu", description="LoLDU adapters for Stable Diffusion")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="print an adapter file's metadata, layers, rank and size")
    s.add_argument("file")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_inspect)

    s = sub.add_parser("blend", help="one adapter file holding a weighted blend: loldu blend A:0.7 B:0.3 -o C")
    s.add_argument("adapters", nargs="+", metavar="FILE[:WEIGHT]")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_blend)

    s = sub.add_parser("export-lora", help="write an adapter (or blend) as an exact standard LoRA")
    s.add_argument("adapters", nargs="+", metavar="ADAPTER[:WEIGHT]")
    s.add_argument("--base", default=None, help="diffusers base model folder (default: the embedded base)")
    s.add_argument("--format", default="diffusers", choices=["diffusers", "kohya"])
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_export_lora)

    s = sub.add_parser("fuse", help="a full diffusers model folder with the adapter(s) fused in")
    s.add_argument("adapters", nargs="+", metavar="ADAPTER[:WEIGHT]")
    s.add_argument("--base", default=None)
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_fuse)

    s = sub.add_parser("generate", help="generate PNGs (settings in their metadata)")
    s.add_argument("--base", default=None)
    s.add_argument("--adapter", action="append", metavar="FILE[:WEIGHT]", help="repeatable")
    s.add_argument("--prompt", required=True)
    s.add_argument("--negative_prompt", default=None)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--guidance", type=float, default=4.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num_images", type=int, default=4)
    s.add_argument("--size", type=int, default=None, help="default: the base model's native size")
    s.add_argument("--device", default=None)
    s.add_argument("-o", "--output", required=True, help="folder")
    s.set_defaults(func=_generate)

    s = sub.add_parser("eval", help="DreamBooth metrics (DINO, CLIP-I, CLIP-T) with evaluation models on disk")
    s.add_argument("--images", required=True, help="folder of generated images")
    s.add_argument("--reference", required=True, help="folder of real subject images")
    s.add_argument("--prompt", required=True, help="the prompt the images were generated from (for CLIP-T)")
    s.add_argument("--clip", required=True, help="local CLIP model folder (transformers CLIPModel)")
    s.add_argument("--dino", default=None, help="local DINO ViT-S/16 folder (transformers)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_eval)

    s = sub.add_parser("app", help="start the web app")
    s.add_argument("--base", default=None)
    s.add_argument("--adapters", default=None, help="folder of adapter files to list")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7860)
    s.set_defaults(func=_app)

    s = sub.add_parser("bench", help="benchmarks: loldu bench cost|learning [--quick] [--json]", add_help=False)
    s.add_argument("bench_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=_bench)
    return p


def main(argv=None) -> int:
    from .adapter_file import AdapterFileError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (AdapterFileError, FileExistsError, FileNotFoundError, ValueError, KeyError) as e:
        msg = str(e).strip("'\"")
        print(f"loldu {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
