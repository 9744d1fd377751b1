"""Library output a user cannot act on, silenced: the console of a training run, the command
line and the app shows our progress, our warnings and the libraries' real errors, nothing else."""
from __future__ import annotations

import contextlib
import logging
import warnings

_done = False


class _Drop(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def quiet_libraries() -> None:
    """Once per process, before the libraries are imported where possible."""
    global _done
    if _done:
        return
    _done = True
    # diffusers ≥ 0.36 renamed `torch_dtype` to `dtype`; we keep `torch_dtype`, which every
    # supported release (≥ 0.30) accepts
    warnings.filterwarnings("ignore", message=r".*`torch_dtype` is deprecated", category=FutureWarning)
    # transformers 5 without torchvision falls back to PIL image processors; the pipelines here
    # never run one (no safety checker, no IP adapter), so the fallback changes nothing
    logging.getLogger("transformers.utils.import_utils").addFilter(_Drop("requires torchvision"))
    # from_single_file casts each converted model to the asked dtype; diffusers then warns about
    # "modules that should be kept in float32" even when the list it names is empty
    logging.getLogger("diffusers.models.modeling_utils").addFilter(_Drop("should be kept in float32: []"))


@contextlib.contextmanager
def no_loading_bars():
    """Hide diffusers' "Loading pipeline components" bar, e.g. while a validation pipeline is
    assembled from models already in memory: it would nest inside the training bar."""
    from diffusers.utils import logging as dlogging

    was = dlogging.is_progress_bar_enabled()
    dlogging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            dlogging.enable_progress_bar()
