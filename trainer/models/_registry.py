"""The model registry: variants register themselves with ``@register_model``; ``create_model``
builds one by name (``timm:NAME`` builds a timm model for token labeling)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

ModelFn = TypeVar("ModelFn", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: ModelFn) -> ModelFn:
    """Register ``fn(**overrides) -> nn.Module`` under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def create_model(name: str, **overrides) -> nn.Module:
    """Build the registered variant ``name`` with config overrides; ``timm:NAME`` builds timm
    model NAME for token labeling (:mod:`trainer.models.timm_models`)."""
    if name.startswith("timm:"):
        from trainer.models.timm_models import create_timm_model

        return create_timm_model(name.removeprefix("timm:"), **overrides)
    try:
        fn = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}, or "
                         "timm:NAME for a timm ViT-family or VOLO model") from None
    return fn(**overrides)


def list_models() -> list[str]:
    """Names of the registered variants, sorted."""
    return sorted(_MODELS)
