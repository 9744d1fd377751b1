"""What to adapt and how: the one configuration object of the project."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

INITS = ("lu", "uniform", "constant", "normal", "ones", "zeros")
EXPORT_FORMATS = ("diffusers", "kohya")  # export.py: diffusers/PEFT LoRA keys; kohya/A1111/ComfyUI keys with ss_* metadata
DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER_FILE = "loldu_adapter.safetensors"  # the trainer's LoLDU output in its folder (beside learned_embeds.safetensors)


@dataclass
class LoLDUConfig:
    rank: int = 32  # per layer, at most the layer's full rank min(out, in)
    alpha: float | None = None  # None → rank, so σ₀ = alpha / rank = 1 as in the paper
    init: str = "lu"
    unet_targets: tuple[str, ...] | None = DEFAULT_UNET_TARGETS
    text_encoder_targets: tuple[str, ...] | None = None  # e.g. DEFAULT_TEXT_ENCODER_TARGETS
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoLDUConfig.rank must be a positive integer, got {self.rank!r}")
        if self.init not in INITS:
            raise ValueError(f"LoLDUConfig.init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.unet_targets is not None:
            self.unet_targets = tuple(self.unet_targets)
        if self.text_encoder_targets is not None:
            self.text_encoder_targets = tuple(self.text_encoder_targets)

    def targets_for(self, comp_name: str) -> tuple[str, ...] | None:
        """The projections to adapt in a component ("unet", "text_encoder", "text_encoder_2")."""
        return self.unet_targets if comp_name == "unet" else self.text_encoder_targets

    @property
    def sigma0(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def to_dict(self) -> dict:
        return asdict(self)
