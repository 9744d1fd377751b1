"""The `loldu` command line: inspect, blend, export-lora, fuse, generate, eval, app, bench."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .config import EXPORT_FORMATS


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
    for k, v in info["metadata"].items():  # a stranger's text, keys too: no terminal escapes
        print(f"  {k if k.isprintable() else json.dumps(k)}: {json.dumps(v) if not isinstance(v, str) or not v.isprintable() else v}")
    return 0


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_specs(specs) -> None:
    """FILE[:WEIGHT] arguments, checked before anything loads: a mistyped weight is reported as
    a weight, not as a missing file; the files are read (a few KB each) and checked on their own."""
    for spec in specs or []:
        if os.path.exists(spec):
            continue
        path, colon, weight = spec.rpartition(":")
        if colon and path and not _is_number(weight):
            raise ValueError(f"{spec}: {weight!r} is not a weight; write FILE:WEIGHT with a number, e.g. {path}:0.7")
        left, eq, right = spec.rpartition("=")
        if not colon and eq and left and _is_number(right):
            raise ValueError(f"{spec}: write the weight after a colon: {left}:{right}")
    from .adapter_file import AdapterFile
    from .pipeline import parse_adapter_spec

    for spec in specs or []:
        AdapterFile.read(parse_adapter_spec(spec)[0])  # a bad file is refused before the base loads


def _check_output(args, folder: bool = False) -> None:
    """-o, checked before anything loads: its parent folder must exist (a typo would otherwise
    create a tree of folders) and an existing output needs --overwrite."""
    parent = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(parent):
        raise ValueError(f"-o {args.output}: the folder {parent} does not exist; create it first or fix the path")
    if folder:
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise ValueError(f"-o {args.output}: a file, not a folder")
    elif os.path.exists(args.output) and not args.overwrite:
        raise FileExistsError(f"-o {args.output} already exists: choose another name, or add --overwrite to replace it")


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device name (cpu, cuda, cuda:1, mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this PyTorch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"--device {device}: {why}; leave --device out to run on the CPU")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: Apple's MPS is not available here; leave --device out to run on the CPU")


def _blend(args) -> int:
    from .pipeline import blend_files

    _check_specs(args.adapters)
    _check_output(args)
    f = blend_files(args.adapters)
    f.save(args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}: blend of {len(args.adapters)} adapters, rank {f.rank}, {os.path.getsize(args.output):,} bytes")
    return 0


def _export_lora(args) -> int:
    from .embeddings import embedding_beside
    from .export import default_format, embedding_warning, export_lora, format_warning
    from .pipeline import load_adapter_specs, load_base, parse_adapter_spec

    _check_specs(args.adapters)
    _check_output(args)
    fmt = args.format or default_format(args.base)
    pipe = load_base(args.base)
    load_adapter_specs(pipe, args.adapters)
    export_lora(pipe, args.output, fmt, overwrite=args.overwrite)
    print(f"wrote {args.output} ({fmt} LoRA, {os.path.getsize(args.output):,} bytes)")
    beside = [embedding_beside(adapter) for adapter, _ in map(parse_adapter_spec, args.adapters)]
    for w in [format_warning(fmt)] + [embedding_warning(f"the token embedding {b}") for b in dict.fromkeys(filter(None, beside))]:
        if w:
            print(f"warning: {w}", file=sys.stderr)
    return 0


def _fuse(args) -> int:
    from .io import atomic_save_dir, check_output_folder
    from .model import fuse_loldu, remove_loldu
    from .pipeline import load_adapter_specs, load_base

    _check_specs(args.adapters)
    _check_output(args)
    check_output_folder(args.output, args.overwrite)  # before the base loads: a file, or the folder we are in
    embeddings = _embeddings_of(args.embedding or [], args.adapters)
    pipe = load_base(args.base)
    load_adapter_specs(pipe, args.adapters)
    tokens = _use_embeddings(pipe, embeddings)  # their rows go into the model's own token table: the folder draws the subject
    fuse_loldu(pipe)
    remove_loldu(pipe, keep_fused=True)
    atomic_save_dir(pipe.save_pretrained, args.output, overwrite=args.overwrite)
    with_rows = f", and the trained embedding of {', '.join(tokens)} in its text encoder" if tokens else ""
    print(f"wrote {args.output}: {os.path.basename(os.path.normpath(pipe._loldu_base_path))} with {', '.join(args.adapters)} fused in{with_rows}")
    return 0


def _prompt_specs(args) -> list[list[str]]:
    """Each prompt's own adapters ('A.safetensors:0.8,B.safetensors' or 'none'), one list per --prompt."""
    if args.prompt_adapters is None:
        return [[] for _ in args.prompt]
    if len(args.prompt_adapters) != len(args.prompt):
        raise ValueError(f"{len(args.prompt)} --prompt but {len(args.prompt_adapters)} --prompt_adapters: give one "
                         "--prompt_adapters per --prompt, in the same order ('none' for a prompt without its own)")
    return [[] if text.strip().lower() == "none" else [x.strip() for x in text.split(",") if x.strip()] for text in args.prompt_adapters]


def _use_embeddings(pipe, paths) -> list[str]:
    """Write the files' rows into the pipeline's token tables, saying which tokens; the tokens."""
    from .embeddings import load_token_embeddings

    tokens = []
    for path in paths:
        these = load_token_embeddings(pipe, path)
        print(f"{path}: token embedding for {', '.join(these)}")
        tokens += these
    return tokens


def _embedding_rows(pipe, paths) -> dict[str, dict]:
    """Each file's rows for the pipeline's tables ((encoder, token id) → (token, row)), saying which tokens."""
    from .embeddings import read_pipeline_embeddings

    rows = {}
    for path in paths:
        rows[path] = read_pipeline_embeddings(pipe, path)
        print(f"{path}: token embedding for {', '.join(dict.fromkeys(t for t, _ in rows[path].values()))}")
    return rows


def _embeddings_of(given: list[str], specs: list[str]) -> dict[str, str]:
    """{path: sha256} of the --embedding files, then of the identifier embedding beside each adapter
    (pivotal tuning writes it there, and the adapter without it draws the class, not the subject),
    each once, checked before the base loads. A token has one row per image: an --embedding's token is not taken
    from a file beside an adapter (said), and two other files for one token are refused."""
    from .embeddings import EmbeddingFileError, embedding_beside, read_embedding_rows
    from .io import file_sha256
    from .pipeline import parse_adapter_spec

    for p in given:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"--embedding {p}: no such file")
    found, owner = {}, {}  # path → its hash; token → (path, what named it, its hash)
    candidates = [(os.path.abspath(p), f"--embedding {p}", True) for p in given]
    for adapter, _ in map(parse_adapter_spec, specs):
        beside = embedding_beside(adapter)
        if beside:
            candidates.append((beside, f"the embedding beside {adapter}", False))
    for path, said, explicit in candidates:
        if path in found:
            continue
        try:
            tokens = {t.lower() for _, t, _ in read_embedding_rows(path)}  # CLIP's tokenizer lower-cases
        except EmbeddingFileError as e:
            raise EmbeddingFileError(f"{said}: {e}") from None
        digest = file_sha256(path)
        taken = {t: owner[t] for t in tokens if t in owner and owner[t][2] != digest}
        if taken:
            t, (other, other_said, _) = next(iter(taken.items()))
            if not explicit and other_said.startswith("--embedding"):
                print(f"{said} is not used: {other_said} gives `{t}` its row")
                continue
            choose = "keep one of the two" if explicit else "generate them in separate runs, or choose one with --embedding FILE"
            raise EmbeddingFileError(f"{said} and {other_said} give `{t}` different rows; a token has one per image: {choose}")
        owner.update({t: (path, said, digest) for t in tokens})
        found[path] = digest
    return found


def _load_blends(pipe, shared: list[str], own: list[list[str]]) -> list[dict[str, float]]:
    """Load every adapter file once (inactive) and return each prompt's blend {name: weight}:
    the --adapter blend plus the prompt's own adapters (weights of one file add up)."""
    from .adapter_file import AdapterFile, load_adapter
    from .pipeline import parse_adapter_spec

    names = _adapter_names(shared + [spec for specs in own for spec in specs])
    for path, name in names.items():
        load_adapter(pipe, AdapterFile.read(path), adapter_name=name, weight=0.0)
    blends = []
    for specs in own:
        blend: dict[str, float] = {}
        for path, w in map(parse_adapter_spec, shared + specs):
            name = names[os.path.abspath(path)]
            blend[name] = blend.get(name, 0.0) + w
        blends.append(blend)
    return blends


def _adapter_names(specs: list[str]) -> dict[str, str]:
    """absolute path → the adapter's name (from its file name, unique), each file once."""
    from .pipeline import adapter_name_for, parse_adapter_spec

    names: dict[str, str] = {}
    for path, _ in map(parse_adapter_spec, specs):
        if os.path.abspath(path) not in names:
            names[os.path.abspath(path)] = adapter_name_for(path, set(names.values()))
    return names


def _generate(args) -> int:
    from tqdm.auto import tqdm

    from .embeddings import TokenRows, embedding_beside
    from .io import save_png_with_settings
    from .pipeline import load_base
    from .serving import generate

    for flag in ("steps", "num_images", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        raise ValueError(f"--guidance {args.guidance}: must be a number ≥ 0 (1 turns guidance off; 4–8 are usual)")
    if args.seed is not None and not 0 <= args.seed <= 2**63 - 1:
        raise ValueError(f"--seed {args.seed}: must be from 0 to {2**63 - 1} (leave it out for a random one)")
    if args.size is not None and (args.size < 8 or args.size % 8):
        raise ValueError(f"--size {args.size}: must be a positive multiple of 8; leave it out for the base model's native size")
    _check_device(args.device)
    own = _prompt_specs(args)
    every_spec = (args.adapter or []) + [spec for specs in own for spec in specs]
    _check_specs(every_spec)
    _check_output(args, folder=True)
    embeddings = _embeddings_of(args.embedding or [], every_spec)
    hashes = _file_hashes(every_spec) | {p: digest[:12] for p, digest in embeddings.items()}
    pipe = load_base(args.base, device=args.device)
    blends = _load_blends(pipe, args.adapter or [], own)
    rows = _embedding_rows(pipe, embeddings)
    explicit = {os.path.abspath(p) for p in args.embedding or []}
    path_of = {n: p for p, n in _adapter_names(every_spec).items()}

    def embeddings_for(blend) -> tuple[str, ...]:  # --embedding's, and the ones beside the prompt's own adapters
        beside = {embedding_beside(path_of[n]) for n in blend}
        return tuple(p for p in embeddings if p in explicit or p in beside)

    if args.compile:
        from .compile import compile_unet

        compile_unet(pipe.unet)
    os.makedirs(args.output, exist_ok=True)
    size = args.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    first = args.seed
    if first is None:  # a new seed each run: running the command again makes new images, not copies
        import random

        first = random.randrange(2**31)
        print(f"seed {first} (random; --seed {first} makes these images again)")
    jobs, present = {}, []  # the token rows they draw with → (prompt, seed, blend, settings) of each image to make
    for i in range(args.num_images):
        for prompt, blend in zip(args.prompt, blends):
            seed, embeds = first + i, embeddings_for(blend)
            settings = {"prompt": prompt, "negative_prompt": args.negative_prompt, "seed": seed, "steps": args.steps,
                        "guidance": args.guidance, "size": size, "base": pipe._loldu_base_path, "adapters": blend,
                        "embeddings": list(embeds), "hashes": {n: hashes[n] for n in [*blend, *embeds]}}
            same = _same_image(args.output, seed, json.dumps(settings))
            if same:  # the same settings and seed make the same image: do not write a copy
                present.append(same)
            else:
                jobs.setdefault(embeds, []).append((prompt, seed, blend, settings))
    written, token_rows = [], TokenRows(pipe)
    # one pipeline call per batch, each image with its own prompt, adapters and seed; token rows are one table for the
    # whole call, so a call holds prompts that use the same identifier embeddings (a prompt without an adapter never
    # draws with another prompt's learned `sks`)
    batches = [(embeds, group[k : k + args.batch_size]) for embeds, group in jobs.items() for k in range(0, len(group), args.batch_size)]
    for embeds, batch in tqdm(batches, desc="generating"):
        token_rows.use({key: row for p in embeds for key, row in rows[p].items()})
        images = generate(pipe, [j[0] for j in batch], [j[2] for j in batch], [j[1] for j in batch],
                          negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                          height=size, width=size)
        written += [save_png_with_settings(im, args.output, j[1], j[3]) for im, j in zip(images, batch)]
    token_rows.use({})
    print(f"wrote {len(written)} image(s) to {args.output}")
    if present:
        print(f"{len(present)} image(s) with these settings and seeds were already there ({', '.join(present)}); "
              "another --seed, or none, makes new ones")
    return 0


def _file_hashes(specs: list[str]) -> dict[str, str]:
    """sha256 (first 12 hex digits, as A1111's LoRA hashes) of each adapter, by the name `_load_blends`
    gives it: a retrained loldu_adapter.safetensors is another image."""
    from .io import file_sha256

    return {n: file_sha256(p)[:12] for p, n in _adapter_names(specs).items()}


def _same_image(folder: str, seed: int, parameters: str) -> str | None:
    """The name of a PNG in `folder` generated with exactly these settings and seed, if any."""
    from PIL import Image

    for name in sorted(os.listdir(folder)):
        if name.endswith(f"_seed{seed}.png"):
            try:
                with Image.open(os.path.join(folder, name)) as im:
                    if im.text.get("parameters") == parameters:
                        return name
            except OSError:
                continue  # not a readable PNG: not ours
    return None


def _eval(args) -> int:
    from .metrics import dreambooth_metrics

    result = dreambooth_metrics(args.images, args.reference, args.prompt, clip_path=args.clip, dino_path=args.dino)
    print(json.dumps(result) if args.json else "\n".join(f"{k:>7}: {v:.4f}" for k, v in result.items() if isinstance(v, float)))
    return 0


def _app(args) -> int:
    from .app import launch

    launch(base=args.base, adapters_dir=args.adapters, host=args.host, port=args.port, auth=args.auth, preload=args.preload,
           outputs=args.outputs, train_args=args.train_args, compile=args.compile)
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions with their defaults (none shown for flags and options without one)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or not action.help:
            return action.help
        return super()._get_help_string(action)


BASE_HELP = "diffusers model folder or single-file .safetensors / .ckpt (SD 1.x/2.x/SDXL); default: the embedded base"
SPEC_HELP = "adapter file, optionally with its weight after a colon (a.safetensors:0.7; default weight 1)"
OVERWRITE_HELP = "replace -o if it exists"
EMBEDDING_HELP = ("a token-embedding file to use with the adapters (learned_embeds.safetensors from --train_text_encoder_ti or "
                  "--method ti; {token: (1, width)}); repeat for several")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loldu", description="LoLDU adapters for Stable Diffusion: inspect, blend, export, fuse, "
                                "generate, evaluate; `loldu COMMAND --help` describes each command", formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, **kw):
        return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter, **kw)

    s = command("inspect", "print an adapter file's metadata, layers, rank and size")
    s.add_argument("file", help="a .safetensors adapter file")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_inspect)

    s = command("blend", "one adapter file holding a weighted blend: loldu blend A:0.7 B:0.3 -o C (no base model needed)")
    s.add_argument("adapters", nargs="+", metavar="FILE[:WEIGHT]", help=SPEC_HELP)
    s.add_argument("-o", "--output", required=True, help="the blended adapter file to write (its folder must exist)")
    s.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    s.set_defaults(func=_blend)

    s = command("export-lora", "write an adapter (or blend) as an exact standard LoRA")
    s.add_argument("adapters", nargs="+", metavar="ADAPTER[:WEIGHT]", help=SPEC_HELP)
    s.add_argument("--base", default=None, help=BASE_HELP + " (the one the adapters were trained on)")
    s.add_argument("--format", default=None, choices=EXPORT_FORMATS,
                   help="diffusers (load_lora_weights) or kohya (A1111, ComfyUI, kohya); default: kohya for a single-file --base, "
                   "else diffusers")
    s.add_argument("-o", "--output", required=True, help="the LoRA .safetensors file to write (its folder must exist)")
    s.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    s.set_defaults(func=_export_lora)

    s = command("fuse", "a full diffusers model folder with the adapter(s) fused in")
    s.add_argument("adapters", nargs="+", metavar="ADAPTER[:WEIGHT]", help=SPEC_HELP)
    s.add_argument("--base", default=None, help=BASE_HELP)
    s.add_argument("-o", "--output", required=True, help="the model folder to write (its parent folder must exist)")
    s.add_argument("--embedding", action="append", default=None, metavar="FILE",
                   help=EMBEDDING_HELP + "; its rows are written into the model's text encoder (as is the embedding beside each adapter)")
    s.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    s.set_defaults(func=_fuse)

    s = command("generate", "generate PNGs with an adapter blend (settings and seed in each PNG's metadata)")
    s.add_argument("--base", default=None, help=BASE_HELP)
    s.add_argument("--adapter", action="append", metavar="FILE[:WEIGHT]", help=SPEC_HELP + "; repeat for a blend (for every prompt)")
    s.add_argument("--prompt", action="append", required=True, help="e.g. 'a photo of sks heart'; repeat for several prompts, "
                   "generated together")
    s.add_argument("--prompt_adapters", action="append", default=None, metavar="FILE[:WEIGHT],...",
                   help="the adapters of one prompt, comma-separated ('none': only --adapter); one per --prompt, in order. Prompts "
                   "with different adapters are generated in one batch")
    s.add_argument("--batch_size", type=int, default=8, help="images per pipeline call")
    s.add_argument("--embedding", action="append", default=None, metavar="FILE", help=EMBEDDING_HELP)
    s.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first call; pays off over many images)")
    s.add_argument("--negative_prompt", default=None, help="what the images should not show")
    s.add_argument("--steps", type=int, default=20, help="sampling steps")
    s.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    s.add_argument("--seed", type=int, default=None, help="seed of the first image (image i uses seed + i); default: a random "
                   "seed, printed and saved in the PNGs")
    s.add_argument("--num_images", type=int, default=4, help="how many images")
    s.add_argument("--size", type=int, default=None, help="width and height in pixels; default: the base model's native size")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or mps; default: cpu")
    s.add_argument("-o", "--output", required=True, help="folder for the PNGs (created if its parent exists)")
    s.set_defaults(func=_generate)

    s = command("eval", "DreamBooth metrics (DINO, CLIP-I, CLIP-T) with evaluation models on disk")
    s.add_argument("--images", required=True, help="folder of generated images")
    s.add_argument("--reference", required=True, help="folder of real subject images")
    s.add_argument("--prompt", required=True, help="the prompt the images were generated from (for CLIP-T)")
    s.add_argument("--clip", required=True, help="local CLIP model folder (transformers CLIPModel)")
    s.add_argument("--dino", default=None, help="local DINO ViT-S/16 folder (transformers)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_eval)

    s = command("app", "start the web app")
    s.add_argument("--base", default=None, help=BASE_HELP)
    s.add_argument("--adapters", default=None, help="folder of adapter files to list; default: the bundled examples with the embedded base")
    s.add_argument("--preload", action="append", default=None, metavar="FILE",
                   help="adapter every new session starts with (repeatable); default: the bundled example with the embedded base")
    s.add_argument("--outputs", default=None, metavar="DIR", help="folder for the results' PNGs, with their settings; default: ./loldu-outputs")
    s.add_argument("--train-args", dest="train_args", default=None, metavar="'ARGS'",
                   help="extra trainer arguments for the Train tab, after an =: --train-args='--mixed_precision bf16' (default: none)")
    s.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every network interface)")
    s.add_argument("--port", type=int, default=7860, help="port to serve on")
    s.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help="ask for this login (Gradio's auth); without it a non-local --host prints a warning")
    s.add_argument("--compile", action="store_true", help="torch.compile the UNet (the first generations compile: minutes on a CPU)")
    s.set_defaults(func=_app)

    command("bench", "benchmarks: loldu bench cost|learning [--quick] [--json]", add_help=False)  # listed here; main() hands it to bench's own parser
    return p


def main(argv=None) -> int:
    from .adapter_file import AdapterFileError
    from .quiet import quiet_libraries

    quiet_libraries()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser: `loldu bench --help` is that parser's help
        from .bench import main as bench_main

        command, run = "bench", lambda: bench_main(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        command, run = args.command, lambda: args.func(args)
    try:
        return run()
    except (AdapterFileError, FileExistsError, FileNotFoundError, ValueError, KeyError) as e:
        msg = str(e).strip("'\"")
        print(f"loldu {command}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only folder, a full disk: one sentence naming the path
        from .io import describe_os_error

        print(f"loldu {command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
