"""Checkpoints in, whatever made them: this project's, the official LV-ViT code's, state dicts.

* **This project's** (``trainer train``): ``{"model", "ema", "config", "num_classes", ...}``; the
  config names the variant and its options.
* **Official LV-ViT** (zihangJiang/TokenLabeling, timm's training script): ``.pth.tar`` files
  holding the weights under ``state_dict`` / ``state_dict_ema`` (or bare), possibly with a
  ``module.`` prefix (DDP), and the stem as ``patch_embed.conv1/bn1/conv2/bn2/conv3/bn3``
  (``patch_embed.stem.0/1/3/4/6/7`` here). The architecture comes from a ``config`` entry when
  there is one (the official constructor's arguments), else from the weights' shapes and the
  registered variant of the same depth and width.
* **Plain state dicts** of a registered model (e.g. saved by hand from ``model.state_dict()``).

Every file is loaded with ``torch.load(weights_only=True)`` (:func:`load_file`): tensors and plain
Python data only, plus the one class the official files hold (timm's training script saves its
``argparse.Namespace`` as ``args``). A pickle holding anything else, such as a ``__reduce__``
that calls ``os.system``, is refused and nothing in it runs: a checkpoint is data, wherever it
came from. This project's own checkpoints (``trainer train``'s ``last.pt``, ``trainer convert``'s
output) hold nothing but tensors and plain data, so they always load this way.

:func:`read_checkpoint` turns any of them into a :class:`Checkpoint` (a model name, config
overrides, weights in this project's key names); :func:`build_model` makes the model;
:func:`load_weights` puts weights into an existing model, resampling the position embedding to
its grid and, for fine-tuning, leaving out heads whose class count differs.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from storage.images import ImageRejected, open_regular
from trainer.models import create_model
from trainer.models.lvvit import LVVIT_CONFIGS

# official ConvStem names -> this project's nn.Sequential indices (conv, BN, ReLU, ...)
OFFICIAL_STEM = {"conv1": "stem.0", "bn1": "stem.1", "conv2": "stem.3", "bn2": "stem.4",
                 "conv3": "stem.6", "bn3": "stem.7"}
# the official constructor's arguments that are this project's config fields as they are
OFFICIAL_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
                   "skip_lam", "num_classes", "qkv_bias", "drop_rate", "attn_drop_rate")
OFFICIAL_STEM_CHANNELS = {"4_2": 64, "4_2_128": 128}
HEADS = ("head.", "aux_head.")
# What an official checkpoint holds beyond tensors and plain data: timm's training script saves
# its command line as an argparse.Namespace ("args"), whose fields are plain values.
OFFICIAL_GLOBALS = [argparse.Namespace]


class CheckpointError(ValueError):
    """A checkpoint this module cannot read as a model (the message says why)."""


@dataclass
class Checkpoint:
    model: str  # a registered variant
    overrides: dict  # config fields (num_classes, img_size, ...)
    weights: dict[str, torch.Tensor]  # this project's key names
    source: str  # "project", "official" or "state_dict"
    extra: dict = field(default_factory=dict)  # a project checkpoint's training config


def read_checkpoint(path: Path, model: str | None = None, use_ema: bool = True) -> Checkpoint:
    """Read ``path`` (any of the module docstring's kinds); ``model`` names the variant when the
    checkpoint cannot tell (a plain state dict), or overrides the guess."""
    obj = load_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if "config" in obj and "model" in obj and isinstance(obj.get("config"), dict) \
            and "model_kwargs" in obj["config"]:
        config = obj["config"]
        weights = obj["model"]
        if use_ema and obj.get("ema"):
            # AveragedModel: "module." prefix and a step counter
            weights = {k.removeprefix("module."): v for k, v in obj["ema"].items()
                       if k.startswith("module.")}
        return Checkpoint(model or config["model"],
                          {"num_classes": obj["num_classes"], "img_size": config["input_size"],
                           **config["model_kwargs"]}, weights, "project", config)
    weights = unwrap_state_dict(obj, use_ema)
    official = any(k.startswith("patch_embed.conv1.") for k in weights)
    weights = rename_official(weights)
    overrides = infer_overrides(weights)
    if isinstance(obj.get("config"), dict):  # the official constructor's arguments
        config = obj["config"]
        overrides.update({k: config[k] for k in OFFICIAL_FIELDS if k in config})
        if config.get("p_emb") in OFFICIAL_STEM_CHANNELS:
            overrides["stem_channels"] = OFFICIAL_STEM_CHANNELS[config["p_emb"]]
    name = model or variant_for(overrides)
    if name is None:
        raise CheckpointError(
            f"{path}: depth {overrides.get('depth')} and width {overrides.get('embed_dim')} "
            "match no registered variant; name one with --model")
    return Checkpoint(name, overrides, weights, "official" if official else "state_dict")


def load_file(path: Path, map_location: str | torch.device = "cpu") -> object:
    """``torch.load`` of ``path`` with ``weights_only=True`` and :data:`OFFICIAL_GLOBALS` (module
    docstring); :class:`CheckpointError` for anything else, in one line."""
    with open_regular_file(path) as f, torch.serialization.safe_globals(OFFICIAL_GLOBALS):
        try:
            return torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))
            if unsafe:
                raise CheckpointError(
                    f"{path}: refused: it holds a {unsafe[1]} object, not only tensors and plain "
                    "data, and loading it could run code (a checkpoint of weights never needs "
                    "to)") from None
            raise CheckpointError(f"{path}: not a torch checkpoint (not a pickle torch can "
                                  "read)") from None
        except Exception as e:  # torch raises many kinds for a damaged or truncated file
            reason = str(e).split(". ")[0].splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{path}: not a torch checkpoint, or a damaged one "
                                  f"({reason})") from None


def open_regular_file(path: Path) -> BinaryIO:
    """``path`` opened as images are (``storage.images.open_regular``: without blocking, a
    regular file only, so a FIFO is refused rather than waited on for a writer that never
    comes); :class:`CheckpointError` saying why not."""
    try:
        return open_regular(path)
    except ImageRejected as e:
        raise CheckpointError(e.reason) from None  # "<path>: not a regular file", ...


def unwrap_state_dict(obj: dict, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a saved state dict, out of ``state_dict_ema`` (when ``use_ema``),
    ``state_dict``, ``model`` or ``module`` wrappers, without a ``module.`` prefix."""
    for key in (("state_dict_ema",) if use_ema else ()) + ("state_dict", "model", "module"):
        if isinstance(obj.get(key), dict) and obj[key]:
            obj = obj[key]
            break
    weights = {k.removeprefix("module."): v for k, v in obj.items()}
    bad = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"not a state dict: {bad[0]!r} is a {type(weights[bad[0]]).__name__}")
    return weights


def rename_official(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official LV-ViT stem names to this project's; every other name is the same."""
    renamed = {}
    for key, value in weights.items():
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "patch_embed" and parts[1] in OFFICIAL_STEM:
            key = ".".join(["patch_embed", OFFICIAL_STEM[parts[1]], *parts[2:]])
        renamed[key] = value
    return renamed


def infer_overrides(weights: dict[str, torch.Tensor]) -> dict:
    """Config fields the weights' shapes fix: width, depth, classes, MLP ratio, stem channels,
    patch size and the training input size (from the position embedding)."""
    out: dict = {}
    if "cls_token" in weights:
        out["embed_dim"] = weights["cls_token"].shape[-1]
    blocks = {int(k.split(".")[1]) for k in weights if k.startswith("blocks.")}
    if blocks:
        out["depth"] = max(blocks) + 1
    if "head.weight" in weights:
        out["num_classes"] = weights["head.weight"].shape[0]
    if "blocks.0.mlp.fc1.weight" in weights and "embed_dim" in out:
        out["mlp_ratio"] = weights["blocks.0.mlp.fc1.weight"].shape[0] / out["embed_dim"]
    if "patch_embed.stem.0.weight" in weights:
        out["stem_channels"] = weights["patch_embed.stem.0.weight"].shape[0]
        out["patch_size"] = 2 * weights["patch_embed.proj.weight"].shape[-1]
    elif "patch_embed.proj.weight" in weights:
        out["patch_size"] = weights["patch_embed.proj.weight"].shape[-1]
    if "pos_embed" in weights and "patch_size" in out:
        side = math.isqrt(weights["pos_embed"].shape[1] - 1)
        if side * side == weights["pos_embed"].shape[1] - 1:
            out["img_size"] = side * out["patch_size"]
    return out


def variant_for(overrides: dict) -> str | None:
    """The registered LV-ViT variant with this depth and width (its heads and residual scale
    are what the weights cannot tell)."""
    for name, config in LVVIT_CONFIGS.items():
        if (config.depth, config.embed_dim) == (overrides.get("depth"),
                                                overrides.get("embed_dim")):
            return name
    return "lvvit_t" if "num_heads" in overrides else None  # a full official config


def build_model(checkpoint: Checkpoint, **overrides) -> nn.Module:
    """The checkpoint's model with its weights, strictly (``overrides``: e.g. ``img_size``, whose
    position embedding is then resampled)."""
    model = create_model(checkpoint.model, **{**checkpoint.overrides, **overrides})
    load_weights(model, checkpoint.weights, strict=True)
    return model


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], strict: bool = True,
                 new_heads: bool = False) -> list[str]:
    """Load ``weights`` into ``model``: the position embedding is resampled to the model's grid;
    with ``new_heads``, heads of another class count are left as initialised (fine-tuning).
    Returns the keys left out."""
    weights = dict(weights)
    own = model.state_dict()
    if "pos_embed" in weights and weights["pos_embed"].shape != own["pos_embed"].shape:
        old = weights["pos_embed"]
        side = math.isqrt(old.shape[1] - 1)
        weights["pos_embed"] = resample_abs_pos_embed(
            old, new_size=list(model.grid), old_size=[side, side], num_prefix_tokens=1)
    skipped = []
    if new_heads:
        for key in [k for k in weights if k.startswith(HEADS)]:
            if weights[key].shape != own[key].shape:
                skipped.append(key)
                del weights[key]
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise CheckpointError(f"weights do not fit {type(model).__name__}: {first}") from None
    missing = [k for k in result.missing_keys if k not in skipped]
    if strict and (missing or result.unexpected_keys):
        raise CheckpointError(f"weights do not fit {type(model).__name__}: missing "
                              f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return skipped


def save_project_checkpoint(checkpoint: Checkpoint, out: Path) -> None:
    """Write ``checkpoint`` in this project's format (what ``trainer eval`` and ``--init``
    read; no optimizer state: a starting point, not a run to resume)."""
    model = build_model(checkpoint)
    fields = dict(checkpoint.overrides)
    num_classes, img_size = fields.pop("num_classes"), fields.pop("img_size", 224)
    config = {"model": checkpoint.model, "input_size": img_size, "model_kwargs": fields,
              "converted_from": checkpoint.source}
    state = {"model": model.state_dict(), "ema": None, "config": config,
             "num_classes": num_classes}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
