"""DreamBooth training: arguments, data, methods (LoLDU, LoRA, OLoRA, full), loop, reports."""
from .args import build_parser, parse_args, resolve_defaults
from .errors import TrainingError
from .loop import main, train

__all__ = ["TrainingError", "build_parser", "main", "parse_args", "resolve_defaults", "train"]
