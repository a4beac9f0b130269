"""Token labeling for timm models: ``create_model("timm:NAME", ...)`` (``--model timm:NAME``).

* **ViT family** (timm's ``VisionTransformer``: ViT, DeiT, ViT with registers ``reg_tokens``):
  :class:`TimmViT` adds an auxiliary per-token head on the patch tokens and applies MixToken to
  the patch embeddings, before timm adds its class/register tokens and position embedding; the
  token outputs are un-mixed with the same box, as :class:`~trainer.models.lvvit.LVViT` does.
* **VOLO** (token labeling's successor, which has its own auxiliary head and MixToken):
  :class:`TimmVOLO` turns them on and reports its box in this project's convention.
* Anything else is refused with the list of what is supported.

Both expose what the trainer uses: ``grid``, ``num_prefix_tokens``, ``forward_train`` ->
``(cls_logits, token_logits, box or None)``, ``forward`` = class logits + 0.5 x the token max
(the LV-ViT inference score), ``no_weight_decay``. Options: ``num_classes``, ``img_size``,
``mix_token``, ``registers`` (ViT: ``reg_tokens``), ``drop_path`` (timm's ``drop_path_rate``),
and any other keyword timm's constructor takes.
"""

from __future__ import annotations

import re

import timm
import torch
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from timm.models.volo import VOLO
from torch import nn

from trainer.models.mixtoken import Box, mix_tokens, sample_mix_box, unmix_tokens

PREFIX = "timm:"
SUPPORTED = "timm ViT-family models (vit_*, deit_* without distillation, vit_*_reg*) and VOLO"
TOKEN_SCORE_WEIGHT = 0.5
UNSUPPORTED_OPTIONS = ("sta", "anf")


def create_timm_model(name: str, num_classes: int = 1000, img_size: int = 224,
                      mix_token: bool = True, registers: int = 0, drop_path: float = 0.0,
                      **kwargs) -> nn.Module:
    """A timm model set up for token labeling (module docstring)."""
    for option in UNSUPPORTED_OPTIONS:
        if kwargs.pop(option, False):
            raise ValueError(f"--{option} is an LV-ViT option; timm model {name!r} has none")
    if name not in timm.list_models():
        raise ValueError(f"{name!r} is not a timm model (`timm.list_models()` lists them)")
    options = {"num_classes": num_classes, "img_size": img_size, "drop_path_rate": drop_path,
               **kwargs}
    try:
        with torch.device("meta"):  # the class only: no memory, no initialisation
            probe = timm.create_model(name, **{**options, "num_classes": 1})
    except TypeError as e:  # a constructor without img_size etc.: not a ViT-family model
        refused = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if refused and refused[1] in kwargs:
            raise ValueError(f"timm model {name!r} has no option {refused[1]!r}") from None
        if kwargs:  # the user's options, of a type the constructor cannot take
            raise ValueError(f"timm model {name!r} cannot take the options "
                             f"{kwargs} ({e})") from None
        raise ValueError(f"token labeling supports {SUPPORTED}; {name!r} is not one ({e})") \
            from None
    if isinstance(probe, VOLO):
        if registers:
            raise ValueError("VOLO has no register tokens")
        return TimmVOLO(timm.create_model(name, **options, use_mix_token=mix_token,
                                          use_aux_head=True, global_pool="token"))
    if isinstance(probe, TimmVisionTransformer) and getattr(probe, "dist_token", None) is None:
        if registers:
            options["reg_tokens"] = registers
        return TimmViT(timm.create_model(name, **options), mix_token)
    raise ValueError(f"token labeling supports {SUPPORTED}; {name!r} is a "
                     f"{type(probe).__name__}")


class TimmViT(nn.Module):
    """A timm ``VisionTransformer`` with an auxiliary token head and MixToken."""

    def __init__(self, vit: TimmVisionTransformer, mix_token: bool = True):
        super().__init__()
        if getattr(vit, "dynamic_img_size", False):
            raise ValueError("dynamic_img_size models are not supported (the grid must be fixed)")
        self.vit = vit
        self.mix_token = mix_token
        self.grid: tuple[int, int] = tuple(vit.patch_embed.grid_size)
        self.img_size = int(vit.patch_embed.img_size[0])  # square inputs, as the trainer makes
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.num_registers = getattr(vit, "num_reg_tokens", 0)
        self.aux_head = nn.Linear(vit.embed_dim, vit.num_classes)
        nn.init.trunc_normal_(self.aux_head.weight, std=0.02)
        nn.init.zeros_(self.aux_head.bias)

    def no_weight_decay(self) -> set[str]:
        return {f"vit.{name}" for name in self.vit.no_weight_decay()}

    def _embed(self, x: torch.Tensor, mix_box: Box | None = None) -> torch.Tensor:
        t = self.vit.patch_embed(x)  # [B, N, D]
        if mix_box is not None:
            t = mix_tokens(t, self.grid, mix_box)
        t = self.vit._pos_embed(t)  # class and register tokens, position embedding
        return self.vit.norm_pre(self.vit.patch_drop(t))

    def forward_features(self, x: torch.Tensor, pre_norm: bool = False,
                         mix_box: Box | None = None) -> torch.Tensor:
        t = self.vit.blocks(self._embed(x, mix_box))
        return t if pre_norm else self.vit.norm(t)

    def forward_head(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vit.forward_head(tokens), self.aux_head(tokens[:, self.num_prefix_tokens:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls_logits, token_logits = self.forward_head(self.forward_features(x))
        return cls_logits + TOKEN_SCORE_WEIGHT * token_logits.amax(dim=1)

    def forward_train(self, x: torch.Tensor, mix_box: Box | None = None,
                      generator: torch.Generator | None = None):
        if mix_box is None and self.training and self.mix_token:
            mix_box = sample_mix_box(*self.grid, generator=generator)
        cls_logits, token_logits = self.forward_head(self.forward_features(x, mix_box=mix_box))
        if mix_box is not None:
            token_logits = unmix_tokens(token_logits, self.grid, mix_box)
        return cls_logits, token_logits, mix_box


class TimmVOLO(nn.Module):
    """timm's VOLO with its auxiliary head and MixToken on; its box (rows first) is returned in
    this project's ``(x1, y1, x2, y2)`` token coordinates. Training mode only for
    ``forward_train``, as the trainer calls it."""

    def __init__(self, volo: VOLO):
        super().__init__()
        self.volo = volo
        self.grid: tuple[int, int] = tuple(volo.pos_embed.shape[1:3])  # the aux tokens' grid
        self.img_size = 16 * self.grid[0]  # VOLO's output tokens have stride 16
        self.num_prefix_tokens = 1
        self.num_registers = 0

    def no_weight_decay(self) -> set[str]:
        return {f"volo.{name}" for name in self.volo.no_weight_decay()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.volo(x)  # eval: class logits + 0.5 x the aux max, as timm computes it

    def forward_train(self, x: torch.Tensor, mix_box: Box | None = None,
                      generator: torch.Generator | None = None):
        if mix_box is not None:
            raise ValueError("VOLO draws its own MixToken box")
        # In training mode VOLO returns (class, aux tokens un-mixed, its box rows-first); its
        # box comes from the global RNG, so a resumed VOLO run does not replay the same boxes.
        # (timm 1.0's forward_train returns the class token's features: its head applied here)
        cls_features, token_logits, (r1, c1, r2, c2) = self.volo.forward_train(x)
        cls_logits = self.volo.head(self.volo.head_drop(cls_features))
        box = (int(c1), int(r1), int(c2), int(r2))
        return cls_logits, token_logits, None if box[0] == box[2] or box[1] == box[3] else box
