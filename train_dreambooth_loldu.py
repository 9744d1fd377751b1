#!/usr/bin/env python
"""DreamBooth with LoLDU: `accelerate launch train_dreambooth_loldu.py [--instance_data_dir DIR ...]`.

With no arguments it trains the bundled example subject on the embedded base model. The
arguments follow diffusers' train_dreambooth_lora.py; see `--help` and the README.
"""
import sys

from loldu_diffusion.training import main

if __name__ == "__main__":
    sys.exit(main())
