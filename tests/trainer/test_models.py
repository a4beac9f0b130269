"""trainer.models: registry, LV-ViT/ViT variants, MixToken, registers, STA and ANF."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.models import LVViT, LVViTConfig, create_model, list_models
from trainer.models.layers import AdaptiveNoiseFilter, patch_pixel_variance, sta_mask
from trainer.models.mixtoken import (
    box_area_fraction,
    box_mask,
    mix_tokens,
    sample_mix_box,
    unmix_tokens,
)

TINY = {"img_size": 32, "num_classes": 10}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------- registry


def test_registry_lists_variants_and_rejects_unknown_names() -> None:
    names = list_models()
    assert isinstance(create_model("lvvit_t", **TINY), LVViT)
    assert {"lvvit_t", "lvvit_s", "lvvit_m", "lvvit_l", "vit_tiny"} <= set(names)
    assert names == sorted(names)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("lvvit_xxl")
    with pytest.raises(TypeError):
        create_model("lvvit_t", not_a_field=1)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        create_model("lvvit_t", img_size=40)


@pytest.mark.parametrize(
    ("name", "millions"),
    [("lvvit_t", 8.5), ("lvvit_s", 26.0), ("lvvit_m", 56.0), ("lvvit_l", 150.0),
     ("vit_tiny", 5.9)],  # DeiT-Ti 5.7 M + the 0.19 M auxiliary head
)
def test_parameter_counts_match_the_paper(name: str, millions: float) -> None:
    with torch.device("meta"):
        model = create_model(name)  # num_classes=1000, 224 px, nothing allocated
    assert model.grid == (14, 14)
    assert n_params(model) / 1e6 == pytest.approx(millions, rel=0.05)


def test_lvvit_architecture_details() -> None:
    with torch.device("meta"):
        t, s, m, large = (create_model(f"lvvit_{v}") for v in "tsml")
        vit = create_model("vit_tiny")
    for model, depth, dim, heads, lam in [
        (t, 12, 240, 4, 1.0), (s, 16, 384, 6, 2.0), (m, 20, 512, 8, 2.0), (large, 24, 768, 12, 3.0)
    ]:
        assert len(model.blocks) == depth and model.embed_dim == dim
        block = model.blocks[0]
        assert block.attn.num_heads == heads and block.skip_lam == lam
        assert block.attn.qkv.bias is None
        assert block.mlp.fc1.out_features == 3 * dim
        assert model.patch_embed.proj.kernel_size == (8, 8)
        assert model.pos_embed.shape == (1, 1 + 196, dim)
    assert t.patch_embed.proj.in_channels == 64 and large.patch_embed.proj.in_channels == 128
    assert vit.blocks[0].attn.qkv.bias is not None and vit.blocks[0].skip_lam == 1.0
    assert vit.patch_embed.proj.kernel_size == (16, 16)
    assert vit.blocks[0].mlp.fc1.out_features == 768


# --------------------------------------------------------------------------------- forward API


@pytest.mark.parametrize("name", list_models())
def test_every_variant_runs_forward_and_forward_train(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, **TINY)
    x = torch.randn(2, 3, 32, 32)
    side = 32 // model.patch_embed.patch_size  # 16 for most, 8 for lvvit_nano
    assert model.grid == (side, side)
    model.train()
    cls_logits, token_logits, box = model.forward_train(x)
    assert cls_logits.shape == (2, 10) and token_logits.shape == (2, side * side, 10)
    assert box is not None and box_mask(box, model.grid).shape == (side * side,)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        assert model.forward_train(x)[2] is None  # no MixToken outside training


def test_forward_is_cls_plus_half_token_max() -> None:
    torch.manual_seed(0)
    model = create_model("lvvit_t", img_size=48, num_classes=7).eval()
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        cls_logits, token_logits = model.forward_head(model.forward_features(x))
        expected = cls_logits + 0.5 * token_logits.max(dim=1).values
        torch.testing.assert_close(model(x), expected)
        cls2, tok2, box = model.forward_train(x)
    assert box is None
    torch.testing.assert_close(cls2, cls_logits)
    torch.testing.assert_close(tok2, token_logits)


def test_pre_norm_features_and_attention_maps() -> None:
    torch.manual_seed(0)
    model = create_model("lvvit_t", **TINY, registers=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pre = model.forward_features(x, pre_norm=True)
        torch.testing.assert_close(model.norm(pre), model.forward_features(x))
        maps = model.attention_maps(x)
    assert len(maps) == 12 and maps[0].shape == (2, 4, 7, 7)
    torch.testing.assert_close(maps[-1].sum(-1), torch.ones(2, 4, 7))


def test_other_input_size_resamples_the_position_embedding() -> None:
    model = create_model("vit_tiny", **TINY).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 48, 48)).shape == (1, 1 + 9, 192)


def test_mix_token_off_and_drop_path_options() -> None:
    model = create_model("lvvit_t", **TINY, mix_token=False, drop_path=0.1).train()
    assert model.forward_train(torch.randn(2, 3, 32, 32))[2] is None
    assert model.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)


# --------------------------------------------------------------------------------- registers


def test_registers_add_tokens_that_are_dropped_at_the_output() -> None:
    torch.manual_seed(0)
    model = create_model("lvvit_t", **TINY, registers=4).eval()
    assert model.num_registers == 4 and model.num_prefix_tokens == 5
    assert model.reg_token.shape == (1, 4, 240)
    assert model.pos_embed.shape == (1, 1 + 4, 240)  # no position embedding for registers
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 1 + 4 + 4, 240)
        cls_logits, token_logits = model.forward_head(tokens)
        # The heads read the class token and the patch tokens only.
        torch.testing.assert_close(token_logits, model.aux_head(tokens[:, 5:]))
        torch.testing.assert_close(cls_logits, model.head(tokens[:, 0]))
    assert token_logits.shape == (2, 4, 10)


# --------------------------------------------------------------------------------- STA


def half_flat_images(batch: int = 2, size: int = 64) -> torch.Tensor:
    """Left half constant (0.5), right half noise: on a 16-px grid, columns 0-1 are flat."""
    torch.manual_seed(1)
    x = torch.randn(batch, 3, size, size)
    x[..., : size // 2] = 0.5
    return x


def test_patch_pixel_variance_pools_all_channels() -> None:
    x = half_flat_images()
    var = patch_pixel_variance(x, 16)
    assert var.shape == (2, 16)
    flat = torch.tensor([c < 2 for _ in range(4) for c in range(4)])
    assert (var[:, flat] == 0).all()
    expected = x[0, :, :16, 48:64].var(unbiased=False)  # patch (row 0, col 3), all channels
    torch.testing.assert_close(var[0, 3], expected)
    assert sta_mask(var).eq(flat).all()  # quantile 0.25 = 0: every flat patch (ties) counts
    assert sta_mask(var, tau=1e-6).eq(flat).all()


@pytest.mark.parametrize("tau", [None, 1e-4])
def test_sta_noises_only_low_variance_patches_and_only_in_training(tau: float | None) -> None:
    torch.manual_seed(0)
    sta = create_model("lvvit_t", img_size=64, num_classes=10, sta=True, sta_tau=tau)
    ref = create_model("lvvit_t", img_size=64, num_classes=10)
    ref.load_state_dict(sta.state_dict())
    x = half_flat_images()
    flat = torch.tensor([c < 2 for _ in range(4) for c in range(4)]).expand(2, 16)
    with torch.no_grad():
        for train in (True, False):
            sta.train(train)
            ref.train(train)
            changed = (sta.patch_tokens(x)[0] - ref.patch_tokens(x)[0]).abs().amax(-1) > 0
            assert changed.eq(flat).all() if train else not changed.any()


# --------------------------------------------------------------------------------- ANF


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_anf_starts_near_identity_without_norm_and_near_layernorm_with_it() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1 + 2 + 16, 32) * 3
    patches = x[:, 3:]
    with torch.no_grad():
        # The gate (sigmoid(-4) ~ 0.018) times a small conv: ~0.1 % of the input.
        out = AdaptiveNoiseFilter(32, norm=False)(x, (4, 4), num_prefix=3)
        assert 0 < rel_err(out[:, 3:], patches) < 3e-3
        shut = AdaptiveNoiseFilter(32, norm=False, gate_bias=-12.0)(x, (4, 4), num_prefix=3)
        assert rel_err(shut[:, 3:], patches) < 1e-5
        # With the LayerNorm, "near identity" is "near LN(T)": it renormalises every token.
        out_n = AdaptiveNoiseFilter(32, norm=True)(x, (4, 4), num_prefix=3)
        assert rel_err(out_n[:, 3:], F.layer_norm(patches, (32,), eps=1e-6)) < 3e-3
        assert rel_err(out_n[:, 3:], patches) > 0.5
        # A low-rank gate starts near the identity as well.
        low = AdaptiveNoiseFilter(32, norm=False, gate_rank=4)(x, (4, 4), num_prefix=3)
        assert 0 < rel_err(low[:, 3:], patches) < 3e-3
    # Class and register tokens bypass the filter.
    assert torch.equal(out[:, :3], x[:, :3]) and torch.equal(out_n[:, :3], x[:, :3])


def test_anf_placement_and_init_in_the_model() -> None:
    model = create_model("lvvit_t", **TINY, anf=True, registers=1)
    assert sorted(int(k) for k in model.anf) == list(range(11))  # every block but the last
    gate_bias = model.anf["0"].gate_out.bias
    assert torch.equal(gate_bias, torch.full_like(gate_bias, -4.0))  # not reset by model init
    assert isinstance(model.anf["0"].norm, torch.nn.LayerNorm)
    x = torch.randn(2, 3, 32, 32)
    assert model.train().forward_train(x)[1].shape == (2, 4, 10)
    custom = create_model("lvvit_t", **TINY, anf=True, anf_layers=[3, 11], anf_norm=False)
    assert sorted(custom.anf) == ["11", "3"]
    assert isinstance(custom.anf["3"].norm, torch.nn.Identity)
    assert len(create_model("lvvit_t", **TINY).anf) == 0
    with pytest.raises(ValueError, match="anf_layers"):
        LVViTConfig(depth=4, anf=True, anf_layers=(4,))


def test_anf_low_rank_gate() -> None:
    d = 240
    full = create_model("lvvit_t", anf=True, anf_layers=[0])
    low = create_model("lvvit_t", anf=True, anf_layers=[0], anf_gate_rank=d // 4)
    count = lambda m: sum(p.numel() for p in m.anf.parameters())  # noqa: E731
    # conv (9 d + d) + LN (2 d) + gate: d x d + d, against d x r + r x d + d.
    assert count(full) == 12 * d + d * d + d
    assert count(low) == 12 * d + 2 * d * (d // 4) + d
    gate = low.anf["0"].gate_out
    assert torch.equal(gate.bias, torch.full_like(gate.bias, -4.0))
    small = create_model("lvvit_t", **TINY, anf=True, anf_gate_rank=2)
    assert small.train().forward_train(torch.randn(2, 3, 32, 32))[1].shape == (2, 4, 10)
    with pytest.raises(ValueError, match="gate_rank"):
        create_model("lvvit_t", **TINY, anf=True, anf_gate_rank=0)


# --------------------------------------------------------------------------------- MixToken


def test_mix_then_unmix_restores_and_takes_the_box_from_the_reversed_batch() -> None:
    grid = (4, 5)
    tokens = torch.randn(3, 20, 6)
    box = (1, 2, 4, 4)  # x1, y1, x2, y2: columns 1-3, rows 2-3
    mixed = mix_tokens(tokens, grid, box)
    inside = box_mask(box, grid)
    assert inside.view(4, 5)[2:4, 1:4].all() and inside.sum() == 6
    torch.testing.assert_close(mixed[:, inside], tokens.flip(0)[:, inside])
    torch.testing.assert_close(mixed[:, ~inside], tokens[:, ~inside])
    torch.testing.assert_close(unmix_tokens(mixed, grid, box), tokens)
    replaced = (mixed != tokens).any(-1)
    assert replaced[1].sum() == 0  # the middle of an odd batch is its own partner
    assert box_area_fraction(box, grid) == replaced[0].sum().item() / 20 == 6 / 20
    with pytest.raises(ValueError):
        mix_tokens(tokens, grid, (0, 0, 6, 1))


def test_unmixed_token_outputs_belong_to_their_own_image() -> None:
    # With no blocks tokens do not interact, so un-mixed outputs equal the unmixed run exactly.
    torch.manual_seed(0)
    model = create_model("vit_tiny", img_size=64, num_classes=10, depth=0).eval()
    x = torch.randn(2, 3, 64, 64)
    box = (1, 0, 3, 2)
    with torch.no_grad():
        _, plain, _ = model.forward_train(x)
        _, unmixed, used = model.forward_train(x, mix_box=box)
    assert used == box
    torch.testing.assert_close(unmixed, plain)


def test_sample_mix_box_stays_inside_the_grid() -> None:
    gen = torch.Generator().manual_seed(0)
    areas = []
    for _ in range(300):
        x1, y1, x2, y2 = box = sample_mix_box(14, 14, generator=gen)
        assert 0 <= x1 <= x2 <= 14 and 0 <= y1 <= y2 <= 14
        areas.append(box_area_fraction(box, (14, 14)))
    assert 0.15 < sum(areas) / len(areas) < 0.5  # E[1 - lam] = 0.5, less after clipping
    x1, y1, x2, y2 = sample_mix_box(3, 7, lam=1.0, generator=gen)
    assert (x2 - x1) * (y2 - y1) == 0  # lam = 1: nothing mixed
    same = [sample_mix_box(14, 14, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert same[0] == same[1]
    with pytest.raises(ValueError):
        sample_mix_box(14, 14, lam=1.5)
    for _ in range(50):  # lam = 0.75: a 7x7 box, smaller where clipped at the border
        x1, y1, x2, y2 = sample_mix_box(14, 14, lam=0.75, generator=gen)
        assert x2 - x1 <= 7 and y2 - y1 <= 7
        if x1 > 0 and x2 < 14 and y1 > 0 and y2 < 14:
            assert (x2 - x1, y2 - y1) == (7, 7)
