"""The `loldu` command line."""
from __future__ import annotations

import argparse
import json
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loldu", description="LoLDU adapters for Stable Diffusion")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("inspect", help="print an adapter file's metadata, layers, rank and size")
    s.add_argument("file")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_inspect)
    return p


def main(argv=None) -> int:
    from .adapter_file import AdapterFileError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (AdapterFileError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"loldu {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
