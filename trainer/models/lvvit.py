"""LV-ViT ("All Tokens Matter: Token Labeling for Training Better Vision Transformers", 2021).

Variants (layers / dim / heads, parameters at 1000 classes and 224 px):
``lvvit_t`` 12/240/4 (~8.5 M), ``lvvit_s`` 16/384/6 (~26 M), ``lvvit_m`` 20/512/8 (~56 M),
``lvvit_l`` 24/768/12 (~150 M), and ``lvvit_nano`` 6/128/4 with a 32-channel stem and patch
8 (~1.1 M; at 64 px an 8 x 8 token grid), not from the paper: sized for CPU runs (the
quickstart, studies).
MLP ratio 3, pre-LN, qkv without bias, each residual branch divided by ``skip_lam`` (1 for T,
2 for S and M, 3 for L). Patch embedding: conv7x7 s2 (3->64) + BN + ReLU, two conv3x3 (64->64)
+ BN + ReLU, then a conv with kernel = stride = 8 to the embedding dim (128 stem channels for L;
total stride 16). Class token + learned position embedding, final LayerNorm, a class-token head
and an auxiliary per-token head (both Linear).
The plain ViT/DeiT baselines in :mod:`trainer.models.vit` are the same class with other defaults.

API of every model (see :class:`LVViT`): ``forward(x)`` (inference score), ``forward_train(x,
mix_box=None)`` (MixToken), ``forward_features(x, pre_norm=False)``, ``forward_head(tokens)``,
``attention_maps(x)``, attributes ``grid``, ``num_registers``, ``num_prefix_tokens``.

Options (config fields, also ``create_model(name, **overrides)`` keywords):

* ``registers`` (Darcet et al. 2024): learnable tokens after the class token, no position
  embedding, dropped at the output.
* ``mix_token``: MixToken in ``forward_train`` when training (see :mod:`.mixtoken`).
* STA, Structured Token Augmentation ("Enhancing Transformer-Based Vision Models: Addressing
  Feature Map Anomalies", 2025): ``x_i + alpha * 1[Var(x_i) < tau] * eps_i``,
  ``eps ~ N(0, sigma^2)``. Choices the paper leaves open, and what controls them:

  - *what the variance is taken over*: the patch's raw input pixels (all channels pooled, the
    ``patch_size`` cell of token ``i``), as the model receives them (normalised). Fixed choice;
    the embedding's variance would depend on the weights being learned.
  - *tau*: ``sta_quantile`` (default 0.25), the per-batch quantile of the patch pixel variances,
    with ``Var <= tau`` so that ties (flat borders, all exactly 0) all count; or ``sta_tau``, an
    absolute threshold (``Var < tau``, in normalised pixel units) that overrides the quantile.
  - *where the noise goes*: on the patch embedding, before MixToken, the class token and the
    position embedding (fixed choice; noise travels with its patch when tokens are mixed).
  - *train-only or not*: training only (``model.training``); fixed choice, as for any
    augmentation.
  - *alpha, sigma*: ``sta_alpha`` (1.0) and ``sta_sigma`` (0.1, in embedding units, so the
    effective noise std is ``alpha * sigma``); ``sta`` (default False) switches STA on.

* ANF, adaptive noise filter (same paper): ``T^ = LN(T + Conv(T) * sigmoid(W T + b))`` between
  transformer layers. Choices the paper leaves open:

  - *conv axis and kernel*: a depthwise conv2d over the ``(h, w)`` patch-token grid, padding
    "same", kernel ``anf_kernel`` (3); class and register tokens bypass the filter unchanged
    (fixed choice: a 1-D conv over the token sequence would mix unrelated tokens at row ends).
  - *which layers*: ``anf_layers``, block indices after which ANF runs (default: after every
    block but the last, so the final LayerNorm alone precedes the heads).
  - *the LayerNorm*: ``anf_norm`` (True). It renormalises every token, so it shrinks high-norm
    outliers whatever the filter does; ``anf_norm=False`` is the variant without it, to tell the
    two effects apart.
  - *init*: gate bias ``anf_gate_bias`` (-4.0, sigmoid ~ 0.018), gate weight and conv weights
    trunc-normal std 0.02, so ANF starts near the identity (near ``LN(T)`` with the norm).
  - *the gate's W*: a full ``D x D`` matrix by default, as the formula reads; it alone is ~4.9 %
    of LV-ViT-T's FLOPs with ANF after 11 blocks. ``anf_gate_rank=r`` factors it as ``D -> r ->
    D`` (``D/4`` halves the gate's cost), for studies where ANF's cost matters.
  - *train-only or not*: ANF is part of the architecture and runs in training and inference.

* Artifact metric: read the residual stream before the final LayerNorm with
  ``forward_features(x, pre_norm=True)``; attention probabilities with ``attention_maps(x)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from torch import nn

from trainer.models._registry import register_model
from trainer.models.layers import (
    AdaptiveNoiseFilter,
    Block,
    ConvStem,
    PatchEmbed,
    patch_pixel_variance,
    sta_mask,
    sta_noise,
)
from trainer.models.mixtoken import Box, mix_tokens, sample_mix_box, unmix_tokens

STEMS = ("conv", "patch")


@dataclass(frozen=True)
class LVViTConfig:
    """Architecture and options of one model; defaults are LV-ViT-S."""

    depth: int = 16
    embed_dim: int = 384
    num_heads: int = 6
    mlp_ratio: float = 3.0
    qkv_bias: bool = False
    skip_lam: float = 2.0
    norm_eps: float = 1e-5  # every LayerNorm; as the official LV-ViT code (timm's ViT: 1e-6)
    stem: str = "conv"  # "conv": LV-ViT's 4-conv stem; "patch": one conv, kernel = stride = patch
    stem_channels: int = 64
    patch_size: int = 16
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path: float = 0.0
    token_score_weight: float = 0.5  # forward(): cls logits + w * max over tokens of aux logits
    mix_token: bool = True
    registers: int = 0
    sta: bool = False
    sta_alpha: float = 1.0
    sta_sigma: float = 0.1
    sta_quantile: float = 0.25
    sta_tau: float | None = None
    anf: bool = False
    anf_layers: tuple[int, ...] | None = None
    anf_kernel: int = 3
    anf_norm: bool = True
    anf_gate_bias: float = -4.0
    anf_gate_rank: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.img_size, list):
            object.__setattr__(self, "img_size", tuple(self.img_size))
        if self.anf_layers is not None:
            object.__setattr__(self, "anf_layers", tuple(int(i) for i in self.anf_layers))
            bad = [i for i in self.anf_layers if not 0 <= i < self.depth]
            if bad:
                raise ValueError(f"anf_layers {bad} outside blocks 0..{self.depth - 1}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
        if self.registers < 0:
            raise ValueError(f"registers must be >= 0, got {self.registers}")
        if not 0.0 <= self.sta_quantile <= 1.0:
            raise ValueError(f"sta_quantile must be in [0, 1], got {self.sta_quantile}")
        h, w = self.img_hw
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def img_hw(self) -> tuple[int, int]:
        s = self.img_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def anf_after(self) -> tuple[int, ...]:
        """Block indices followed by ANF (empty when ``anf`` is off)."""
        if not self.anf:
            return ()
        return self.anf_layers if self.anf_layers is not None else tuple(range(self.depth - 1))


class LVViT(nn.Module):
    """LV-ViT with token-labeling heads, MixToken, registers, STA and ANF options."""

    config_cls: ClassVar[type[LVViTConfig]] = LVViTConfig

    def __init__(self, config: LVViTConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = config if config is not None else self.config_cls()
        cfg = replace(cfg, **overrides) if overrides else cfg
        self.config = cfg
        d = cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.embed_dim = d
        self.patch_size = cfg.patch_size
        if cfg.stem == "conv":
            self.patch_embed = ConvStem(cfg.in_chans, d, cfg.patch_size, cfg.stem_channels)
        else:
            self.patch_embed = PatchEmbed(cfg.in_chans, d, cfg.patch_size)
        self.grid: tuple[int, int] = self.patch_embed.grid_size(*cfg.img_hw)
        self.num_registers = cfg.registers
        self.num_prefix_tokens = 1 + cfg.registers
        num_patches = self.grid[0] * self.grid[1]

        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.registers, d)) if cfg.registers else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, d))
        self.pos_drop = nn.Dropout(cfg.drop_rate)

        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.skip_lam,
                  drop=cfg.drop_rate, attn_drop=cfg.attn_drop_rate, drop_path=rate,
                  norm_eps=cfg.norm_eps)
            for rate in rates
        )
        self.anf = nn.ModuleDict({
            str(i): AdaptiveNoiseFilter(d, cfg.anf_kernel, cfg.anf_norm, cfg.anf_gate_bias,
                                        cfg.anf_gate_rank, cfg.norm_eps)
            for i in cfg.anf_after
        })
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.head = nn.Linear(d, cfg.num_classes)
        self.aux_head = nn.Linear(d, cfg.num_classes)
        self.init_weights()

    # ----------------------------------------------------------------------------- init
    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if self.reg_token is not None:
            trunc_normal_(self.reg_token, std=0.02)
        self.apply(_init_linear_and_norm)
        for anf in self.anf.values():
            anf.init_weights()

    @property
    def img_size(self) -> int | tuple[int, int]:
        """The training input size (what evaluation resizes images to)."""
        return self.config.img_size

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay."""
        return {"pos_embed", "cls_token", "reg_token"}

    # ----------------------------------------------------------------------------- tokens
    def grid_for(self, x: torch.Tensor) -> tuple[int, int]:
        """Patch grid ``(h, w)`` for an input batch (``grid`` at the configured size)."""
        return self.patch_embed.grid_size(x.shape[-2], x.shape[-1])

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid == self.grid:
            return self.pos_embed
        return resample_abs_pos_embed(
            self.pos_embed, new_size=list(grid), old_size=list(self.grid), num_prefix_tokens=1)

    def patch_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch embeddings ``[B, N, D]`` (STA applied when training) and the grid."""
        t = self.patch_embed(x)
        grid = (t.shape[-2], t.shape[-1])
        t = t.flatten(2).transpose(1, 2)
        cfg = self.config
        if self.training and cfg.sta:
            var = patch_pixel_variance(x, self.patch_size)
            if var.shape[1] != t.shape[1]:
                raise ValueError(
                    f"STA needs image sides that are multiples of {self.patch_size}, "
                    f"got {tuple(x.shape[-2:])}")
            mask = sta_mask(var, cfg.sta_quantile, cfg.sta_tau)
            t = sta_noise(t, mask, cfg.sta_alpha, cfg.sta_sigma)
        return t, grid

    def _embed(
        self, x: torch.Tensor, mix_box: Box | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        b = x.shape[0]
        t, grid = self.patch_tokens(x)
        if mix_box is not None:
            t = mix_tokens(t, grid, mix_box)
        t = torch.cat([self.cls_token.expand(b, -1, -1), t], dim=1) + self._pos_embed(grid)
        if self.reg_token is not None:
            t = torch.cat([t[:, :1], self.reg_token.expand(b, -1, -1), t[:, 1:]], dim=1)
        return self.pos_drop(t), grid

    def _blocks(
        self,
        t: torch.Tensor,
        grid: tuple[int, int],
        attn_out: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if attn_out is not None:
                attn_out.append(block.attention_probs(t))
            t = block(t)
            key = str(i)
            if key in self.anf:
                t = self.anf[key](t, grid, self.num_prefix_tokens)
        return t

    # ----------------------------------------------------------------------------- API
    def forward_features(self, x: torch.Tensor, pre_norm: bool = False) -> torch.Tensor:
        """All tokens ``[B, 1 + R + N, D]`` (class, registers, patches) after the final norm,
        or the residual stream before it with ``pre_norm=True`` (for the artifact metric)."""
        t, grid = self._embed(x)
        t = self._blocks(t, grid)
        return t if pre_norm else self.norm(t)

    def forward_head(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cls_logits [B, C], token_logits [B, N, C])``; register tokens are dropped."""
        return self.head(tokens[:, 0]), self.aux_head(tokens[:, self.num_prefix_tokens:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference score ``[B, C]``: cls logits + w * max over patch tokens of the aux logits."""
        cls_logits, token_logits = self.forward_head(self.forward_features(x))
        return cls_logits + self.config.token_score_weight * token_logits.amax(dim=1)

    def forward_train(
        self,
        x: torch.Tensor,
        mix_box: Box | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Box | None]:
        """``(cls_logits [B, C], token_logits [B, N, C], box or None)`` for token labeling.

        In training mode with ``mix_token``, a MixToken box is sampled (with ``generator``) unless
        ``mix_box`` is given; a given ``mix_box`` is always applied. The token logits come back
        un-mixed (token ``i`` of sample ``b`` is about sample ``b``'s image); the class logits are
        for the mixed image: mix the class target by ``box_area_fraction(box, grid)``.
        """
        if mix_box is None and self.training and self.config.mix_token:
            mix_box = sample_mix_box(*self.grid_for(x), generator=generator)
        t, grid = self._embed(x, mix_box)
        cls_logits, token_logits = self.forward_head(self.norm(self._blocks(t, grid)))
        if mix_box is not None:
            token_logits = unmix_tokens(token_logits, grid, mix_box)
        return cls_logits, token_logits, mix_box

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Attention probabilities of every block, each ``[B, heads, T, T]`` over all tokens
        (class, registers, patches), for the CLS-attention entropy."""
        t, grid = self._embed(x)
        maps: list[torch.Tensor] = []
        self._blocks(t, grid, attn_out=maps)
        return maps


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


LVVIT_CONFIGS: dict[str, LVViTConfig] = {
    "lvvit_t": LVViTConfig(depth=12, embed_dim=240, num_heads=4, skip_lam=1.0),
    "lvvit_s": LVViTConfig(depth=16, embed_dim=384, num_heads=6, skip_lam=2.0),
    "lvvit_m": LVViTConfig(depth=20, embed_dim=512, num_heads=8, skip_lam=2.0),
    "lvvit_l": LVViTConfig(depth=24, embed_dim=768, num_heads=12, skip_lam=3.0,
                           stem_channels=128),
    "lvvit_nano": LVViTConfig(depth=6, embed_dim=128, num_heads=4, skip_lam=1.0,
                              stem_channels=32, patch_size=8, img_size=64),
}


@register_model
def lvvit_t(**overrides) -> LVViT:
    """LV-ViT-T: 12 layers, 240 dim, 4 heads (~8.5 M parameters)."""
    return LVViT(LVVIT_CONFIGS["lvvit_t"], **overrides)


@register_model
def lvvit_s(**overrides) -> LVViT:
    """LV-ViT-S: 16 layers, 384 dim, 6 heads, residual / 2 (~26 M parameters)."""
    return LVViT(LVVIT_CONFIGS["lvvit_s"], **overrides)


@register_model
def lvvit_m(**overrides) -> LVViT:
    """LV-ViT-M: 20 layers, 512 dim, 8 heads, residual / 2 (~56 M parameters)."""
    return LVViT(LVVIT_CONFIGS["lvvit_m"], **overrides)


@register_model
def lvvit_l(**overrides) -> LVViT:
    """LV-ViT-L: 24 layers, 768 dim, 12 heads, 128 stem channels, residual / 3 (~150 M)."""
    return LVViT(LVVIT_CONFIGS["lvvit_l"], **overrides)


@register_model
def lvvit_nano(**overrides) -> LVViT:
    """LV-ViT-nano (not in the paper): 6 layers, 128 dim, 4 heads, 32 stem channels, patch 8,
    64 px (8 x 8 tokens); ~7 ms per image per training step on 2 CPU cores."""
    return LVViT(LVVIT_CONFIGS["lvvit_nano"], **overrides)
