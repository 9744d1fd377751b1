"""Sampler names as A1111 and ComfyUI users know them, mapped to diffusers schedulers.

Each is built from the base model's own scheduler config, so what the base was trained with
(prediction type, beta schedule, zero-SNR rescaling, timestep spacing) is kept; only the
sampling method changes.
"""
from __future__ import annotations

DEFAULT = "default"

# name → (diffusers class name, config overrides), as diffusers' docs map A1111's samplers
SAMPLERS = {
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    # DDIM's own defaults clip the predicted sample to [-1, 1] (pixel-space models): latents are not
    # bounded so, and SD's configs turn it off
    "DDIM": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
NAMES = (DEFAULT, *SAMPLERS)


def make_scheduler(name: str, base_scheduler):
    """A scheduler for `name` from the base's scheduler (DEFAULT: the base's own, as shipped)."""
    import diffusers

    if name == DEFAULT:
        return base_scheduler
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(NAMES)}")
    cls_name, overrides = SAMPLERS[name]
    return getattr(diffusers, cls_name).from_config(base_scheduler.config, **overrides)
