"""Models: ``create_model(name, **overrides)``, ``list_models()``, ``register_model`` (the
registry itself is ``_registry``, which the variant modules import, as timm's do).

Variants register themselves when their module is imported (below).
``overrides`` are config fields (``num_classes``, ``img_size``, ``registers``, ``sta``, ``anf``,
``mix_token``, ``drop_path``, ...; see :class:`trainer.models.lvvit.LVViTConfig`).
"""

from __future__ import annotations

from trainer.models import lvvit, vit
from trainer.models._registry import check_options, create_model, list_models, register_model
from trainer.models.lvvit import LVViT, LVViTConfig
from trainer.models.vit import VisionTransformer, ViTConfig

__all__ = [
    "LVViT",
    "LVViTConfig",
    "ViTConfig",
    "VisionTransformer",
    "check_options",
    "create_model",
    "list_models",
    "lvvit",
    "register_model",
    "vit",
]
