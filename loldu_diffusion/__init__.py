"""loldu-diffusion: LoLDU personalization for Stable Diffusion (only a diagonal is trained)."""
from .adapter_file import AdapterFile, AdapterFileError, load_adapter, save_adapter
from .config import INITS, LoLDUConfig
from .embeddings import load_token_embeddings
from .layer import LoLDULayer, LoLDUVector
from .ldu import LDUFactors, decompose_ldu
from .model import (
    adapter_names,
    delete_adapter,
    fuse_loldu,
    get_adapter_weights,
    inject_loldu,
    iter_layers,
    loldu_disabled,
    loldu_parameters,
    remove_loldu,
    set_adapter_weights,
    set_loldu_enabled,
    unfuse_loldu,
)
from .processor import LoLDUAttnProcessor
from .serving import per_sample_adapters, set_sample_weights

__version__ = "0.1.0"
__all__ = [
    "AdapterFile", "AdapterFileError", "INITS", "LDUFactors", "LoLDUAttnProcessor", "LoLDUConfig",
    "LoLDULayer", "LoLDUVector", "adapter_names", "decompose_ldu", "delete_adapter", "fuse_loldu",
    "get_adapter_weights", "inject_loldu", "iter_layers", "load_adapter", "loldu_disabled",
    "load_token_embeddings", "loldu_parameters", "per_sample_adapters", "remove_loldu", "save_adapter", "set_adapter_weights", "set_loldu_enabled",
    "set_sample_weights", "unfuse_loldu",
]
