"""Plain ViT / DeiT baselines with the same heads, options and API as :mod:`.lvvit`.

DeiT ("Training data-efficient image transformers", 2021) architecture: a single conv patch
embedding (kernel = stride = 16), MLP ratio 4, qkv with bias, no residual scaling; plus the
token-labeling auxiliary head, MixToken, registers, STA and ANF options of
:class:`~trainer.models.lvvit.LVViT` (documented there). ``vit_tiny`` = DeiT-Ti 12/192/3 (~5.9 M
parameters with the auxiliary head), ``vit_small`` = DeiT-S 12/384/6 (~22.4 M).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.models._registry import register_model
from trainer.models.lvvit import LVViT, LVViTConfig


@dataclass(frozen=True)
class ViTConfig(LVViTConfig):
    """LVViTConfig with ViT/DeiT defaults (DeiT-Ti)."""

    depth: int = 12
    embed_dim: int = 192
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    skip_lam: float = 1.0
    norm_eps: float = 1e-6  # timm's ViT / DeiT
    stem: str = "patch"


class VisionTransformer(LVViT):
    """ViT/DeiT: :class:`LVViT` with a patch-conv stem and ViT defaults."""

    config_cls = ViTConfig


VIT_CONFIGS: dict[str, ViTConfig] = {
    "vit_tiny": ViTConfig(depth=12, embed_dim=192, num_heads=3),
    "vit_small": ViTConfig(depth=12, embed_dim=384, num_heads=6),
}


@register_model
def vit_tiny(**overrides) -> VisionTransformer:
    """DeiT-Ti: 12 layers, 192 dim, 3 heads, patch 16."""
    return VisionTransformer(VIT_CONFIGS["vit_tiny"], **overrides)


@register_model
def vit_small(**overrides) -> VisionTransformer:
    """DeiT-S: 12 layers, 384 dim, 6 heads, patch 16."""
    return VisionTransformer(VIT_CONFIGS["vit_small"], **overrides)
