"""The model registry: variants register themselves with ``@register_model``; ``create_model``
builds one by name (``timm:NAME`` builds a timm model for token labeling)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
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


def check_options(name: str, options: Mapping[str, object],
                  reserved: Mapping[str, str] | None = None) -> None:
    """Refuse, with a ``ValueError`` that says why, ``options`` for model ``name`` that are
    in ``reserved`` (option -> who sets it), not config fields of the registered variant (the
    message lists them), or of a type its field does not take. ``timm:NAME`` options are timm's
    constructor's: only ``reserved`` is checked here, timm refuses unknown ones when it builds."""
    reserved = reserved or {}
    for key in options:
        if key in reserved:
            raise ValueError(f"model option {key!r} is set by the trainer ({reserved[key]}), "
                             "not by --model-kwargs")
    if name.startswith("timm:"):
        return
    with torch.device("meta"):  # the config only: no memory, no initialisation
        config = create_model(name).config
    types_of = typing.get_type_hints(type(config))
    fields = [f.name for f in dataclasses.fields(config) if f.name not in reserved]
    for key, value in options.items():
        if key not in fields:
            raise ValueError(f"{name} has no option {key!r}; its options are: "
                             f"{', '.join(fields)}")
        if not _fits(value, types_of[key]):
            raise ValueError(f"{name} option {key!r} takes {_type_name(types_of[key])}, "
                             f"not {value!r}")


def _fits(value: object, hint: object) -> bool:
    """Whether a JSON value can be a config field of type ``hint`` (int for float, a list for a
    tuple; never a bool for a number)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        items = args[:1] * len(value) if args[-1:] == (Ellipsis,) else args
        return len(items) == len(value) and all(map(_fits, value, items))
    if hint is type(None):
        return value is None
    if hint in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if hint is float else hint)


def _type_name(hint: object) -> str:
    return getattr(hint, "__name__", None) or str(hint)
