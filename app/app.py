"""loldu-diffusion web app: python app/app.py [--base PATH] [--adapters DIR] [--preload FILE] [--outputs DIR] [--train-args='ARGS'] [--host H] [--port P] [--auth USER:PASSWORD] [--compile]"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loldu_diffusion.app import launch  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--base", default=None, help="diffusers model folder or single-file .safetensors / .ckpt (default: the embedded base)")
    p.add_argument("--adapters", default=None, help="folder of .safetensors adapters to list (default: assets/adapters)")
    p.add_argument("--preload", action="append", default=None, metavar="FILE",
                   help="adapter every new session starts with (repeatable; default: the bundled example on the embedded base)")
    p.add_argument("--outputs", default=None, metavar="DIR", help="folder for the results' PNGs (default: ./loldu-outputs)")
    p.add_argument("--train-args", dest="train_args", default=None, metavar="'ARGS'",
                   help="extra trainer arguments for the Train tab, after an =: --train-args='--mixed_precision bf16' (default: none)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="ask for this login (Gradio's auth)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (the first generations compile: minutes on a CPU)")
    a = p.parse_args()
    try:
        launch(a.base, a.adapters, a.host, a.port, auth=a.auth, preload=a.preload, outputs=a.outputs, train_args=a.train_args,
               compile=a.compile)
    except (ValueError, FileNotFoundError) as e:  # a mistyped option: one line, as the CLI says it
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
