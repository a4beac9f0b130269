"""Building blocks shared by the ViT families in :mod:`trainer.models`.

* :class:`Attention` / :class:`Block`: pre-LN transformer block with an optional constant
  residual-branch divisor (LV-ViT's ``skip_lam``); attention can also return its probabilities
  (for the CLS-attention entropy of the artifact metric), which timm's ``Attention`` does not.
* :class:`ConvStem` (LV-ViT's 4-conv patch embedding) and :class:`PatchEmbed` (one conv,
  kernel = stride = patch size, as in ViT/DeiT).
* STA helpers: :func:`patch_pixel_variance`, :func:`sta_mask`, :func:`sta_noise`.
* :class:`AdaptiveNoiseFilter` (ANF).

The STA/ANF choices the paper leaves open are documented in :mod:`trainer.models.lvvit`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

LN_EPS = 1e-6  # timm's ViT; LV-ViT as published uses 1e-5 (LVViTConfig.norm_eps)


class Attention(nn.Module):
    """Multi-head self-attention (scaled dot product, fused when available)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self._qkv(x)
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        out = out.transpose(1, 2).reshape(b, t, d)
        return self.proj_drop(self.proj(out))

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention weights ``[B, heads, T, T]`` (rows: queries) for input ``x``."""
        q, k, _ = self._qkv(x)
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


class Block(nn.Module):
    """Pre-LN block: ``x + branch(LN(x)) / skip_lam`` for attention, then for the MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        skip_lam: float = 1.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = LN_EPS,
    ) -> None:
        super().__init__()
        self.skip_lam = skip_lam
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x))) / self.skip_lam
        return x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.attention_probs(self.norm1(x))


class ConvStem(nn.Module):
    """LV-ViT patch embedding: conv7x7 s2 + BN + ReLU, 2x (conv3x3 + BN + ReLU), then a conv
    with kernel = stride = ``patch_size // 2`` to ``embed_dim`` (total stride ``patch_size``)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 16, channels: int = 64):
        super().__init__()
        if patch_size % 2:
            raise ValueError(f"the conv stem needs an even patch_size, got {patch_size}")
        self.patch_size = patch_size
        c = channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, c, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
        )
        self.proj = nn.Conv2d(c, embed_dim, patch_size // 2, stride=patch_size // 2)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        k = self.patch_size // 2
        return (height + 1) // 2 // k, (width + 1) // 2 // k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, D, h, w]``."""
        return self.proj(self.stem(x))


class PatchEmbed(nn.Module):
    """ViT patch embedding: one conv with kernel = stride = ``patch_size``."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 16):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, D, h, w]``."""
        return self.proj(x)


def patch_pixel_variance(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Variance over each patch's raw pixels, all channels pooled: ``[B, C, H, W]`` -> ``[B, N]``.

    Patches are the ``patch_size`` cells of the token grid (row-major, like the tokens); a ragged
    border is dropped, as the stride-``patch_size`` embedding does. Two-pass (centred) so that a
    constant patch gets a variance of (almost exactly) zero. Computed in float32, no grad.
    """
    p = patch_size
    with torch.no_grad():
        x = images.float()
        mean = F.avg_pool2d(x, p).mean(1, keepdim=True)  # [B, 1, h, w]: mean over C*p*p pixels
        h, w = mean.shape[-2:]
        x = x[..., : h * p, : w * p]
        centred = x - mean.repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1)
        return F.avg_pool2d(centred.square(), p).mean(1).flatten(1)


def sta_mask(
    variance: torch.Tensor, quantile: float = 0.25, tau: float | None = None
) -> torch.Tensor:
    """Which patches get STA noise: ``variance < tau`` when ``tau`` is given (absolute, in the
    units of the model's input pixels); otherwise ``variance <= q``, ``q`` the ``quantile`` of all
    patch variances in the batch (``<=`` so that ties at zero, e.g. flat borders, all count)."""
    if tau is not None:
        return variance < tau
    threshold = torch.quantile(variance.flatten().float(), quantile)
    return variance <= threshold


def sta_noise(
    tokens: torch.Tensor, mask: torch.Tensor, alpha: float, sigma: float
) -> torch.Tensor:
    """``tokens + alpha * mask * eps``, ``eps ~ N(0, sigma^2)`` per token and channel."""
    eps = torch.randn_like(tokens) * sigma
    return tokens + alpha * mask.unsqueeze(-1).to(tokens.dtype) * eps


class AdaptiveNoiseFilter(nn.Module):
    """ANF: ``T^ = LN(T + DWConv(T) * sigmoid(W T + b))`` on the patch tokens.

    ``DWConv`` is a depthwise conv2d over the ``(h, w)`` patch-token grid (``padding="same"``);
    the ``num_prefix`` leading tokens (class, registers) pass through unchanged. ``norm=False``
    drops the LayerNorm. ``W`` is a full ``dim x dim`` matrix, or with ``gate_rank=r`` a product
    of ``dim -> r -> dim`` projections (``2 r dim`` multiply-adds per token instead of
    ``dim**2``: the full gate is most of ANF's cost). The gate bias starts at ``gate_bias``
    (negative) and ``W`` and the conv weights are small, so at init the filter is close to the
    identity (``norm=False``) or to ``LN(T)`` (``norm=True``).
    """

    def __init__(
        self, dim: int, kernel_size: int = 3, norm: bool = True, gate_bias: float = -4.0,
        gate_rank: int | None = None, norm_eps: float = LN_EPS,
    ) -> None:
        super().__init__()
        if gate_rank is not None and not 0 < gate_rank <= dim:
            raise ValueError(f"gate_rank must be in 1..{dim}, got {gate_rank}")
        self.gate_bias = gate_bias
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding="same", groups=dim)
        self.gate = nn.Linear(dim, dim) if gate_rank is None else nn.Sequential(
            nn.Linear(dim, gate_rank, bias=False), nn.Linear(gate_rank, dim))
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if norm else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.conv.weight, std=0.02)
        nn.init.zeros_(self.conv.bias)
        for layer in self.gate.modules():
            if isinstance(layer, nn.Linear):
                trunc_normal_(layer.weight, std=0.02)
        nn.init.constant_(self.gate_out.bias, self.gate_bias)

    @property
    def gate_out(self) -> nn.Linear:
        """The gate's last projection, which holds ``b``."""
        return self.gate[-1] if isinstance(self.gate, nn.Sequential) else self.gate

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
        prefix, t = x[:, :num_prefix], x[:, num_prefix:]
        b, _, d = t.shape
        h, w = grid
        conv = self.conv(t.transpose(1, 2).reshape(b, d, h, w)).flatten(2).transpose(1, 2)
        t = self.norm(t + conv * torch.sigmoid(self.gate(t)))
        return torch.cat([prefix, t], dim=1)
