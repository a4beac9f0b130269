"""The dense teacher: the dense/global invariant, checkpoint loading, refusing other heads."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from labeler_service.sample import make_random_checkpoint
from labeler_service.teacher import (
    DenseTeacher,
    TeacherError,
    build_teacher,
    file_sha256,
    fold_weight_standardization,
)
from storage import LABEL_ARRAYS


def test_dense_mean_equals_model_logits(checkpoint: Path):
    teacher, spec, grid = build_teacher("test_nfnet", checkpoint, 128)
    x = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = teacher(x)
        expected = teacher.model(x)
    assert dense.shape == (3, spec.num_classes, *grid) and grid == (4, 4)
    torch.testing.assert_close(dense.mean(dim=(2, 3)), expected, rtol=1e-4, atol=1e-4)

    out = teacher.summarise(x, topk=2)
    torch.testing.assert_close(out.global_logits, expected.topk(2, dim=1).values,
                               rtol=1e-4, atol=1e-4)
    assert (out.global_classes == expected.topk(2, dim=1).indices).all()
    assert (out.logits[:, 0] >= out.logits[:, 1]).all()  # descending along K
    torch.testing.assert_close(out.lse, dense.logsumexp(dim=1))
    assert torch.equal(out.logits, dense.gather(1, out.classes))


def test_spec_records_checkpoint_and_geometry(checkpoint: Path):
    _, spec, _ = build_teacher("test_nfnet", checkpoint, 96)
    assert spec.num_classes == 3  # taken from the checkpoint, not the model default
    assert spec.checkpoint_sha256 == file_sha256(checkpoint)
    assert (spec.input_size, spec.resize, spec.interpolation) == (96, "squash", "bicubic")
    assert spec.mean == (0.5, 0.5, 0.5)  # test_nfnet's own normalisation, from timm


def test_pth_checkpoints_with_wrappers_load(tmp_path: Path):
    plain = make_random_checkpoint(tmp_path / "plain.pth", num_classes=7, seed=3)
    state = torch.load(plain, weights_only=True)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    a, spec_a, _ = build_teacher("test_nfnet", plain, 64)
    b, spec_b, _ = build_teacher("test_nfnet", wrapped, 64)
    assert spec_a.num_classes == spec_b.num_classes == 7
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert spec_a.class_names == ()  # only 1000-class teachers get ImageNet names


def test_imagenet_teachers_get_class_names(tmp_path: Path):
    _, spec, _ = build_teacher("test_nfnet", None, 64)
    assert spec.num_classes == 1000 and spec.checkpoint_sha256 is None
    assert spec.class_names[0].startswith("tench")


def test_wrong_checkpoint_is_refused_clearly(tmp_path: Path):
    other = make_random_checkpoint(tmp_path / "resnet.pth", model="resnet10t", num_classes=3)
    with pytest.raises(TeacherError, match=r"no 'head\.fc\.weight'"):
        build_teacher("test_nfnet", other, 64)
    with pytest.raises(TeacherError, match="does not exist"):
        build_teacher("test_nfnet", tmp_path / "missing.pth", 64)
    with pytest.raises(TeacherError, match="unknown timm model"):
        build_teacher("no_such_model", None, 64)
    truncated = make_random_checkpoint(tmp_path / "t.pth", num_classes=3)
    state = torch.load(truncated, weights_only=True)
    state.pop("stem.conv1.weight")
    torch.save(state, truncated)
    with pytest.raises(TeacherError, match="does not fit test_nfnet"):
        build_teacher("test_nfnet", truncated, 64)


def test_heads_other_than_avg_pool_linear_are_refused():
    model = timm.create_model("test_nfnet", pretrained=False, num_classes=5, global_pool="max")
    with pytest.raises(TeacherError, match="not global average pool"):
        DenseTeacher(model.eval()).check_dense_invariant(64)
    headless = timm.create_model("test_nfnet", pretrained=False, num_classes=0)
    with pytest.raises(TeacherError, match="not a linear layer"):
        DenseTeacher(headless)


def test_labels_stay_float32_under_autocast(checkpoint: Path):
    """The CUDA path runs the backbone under autocast; CPU bf16 autocast exercises the same code."""
    from labeler_service.labeling import TeacherRunner

    teacher, spec, _ = build_teacher("test_nfnet", checkpoint, 64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    exact = teacher.summarise(x, topk=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = teacher.summarise(x, topk=2)
    for name in ("logits", "lse", "global_logits"):
        assert getattr(out, name).dtype == torch.float32, name
    torch.testing.assert_close(out.lse, exact.lse, rtol=0.05, atol=0.05)

    pixels = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    runner = TeacherRunner(teacher, spec.mean, spec.std, 2, torch.device("cpu"), "bf16")
    out = runner(pixels)
    assert list(out) == list(LABEL_ARRAYS)  # the store's label arrays, by name
    assert (out["logits"].dtype, out["classes"].dtype, out["lse"].dtype) == (
        np.float16, np.int16, np.float32)
    assert out["global_logits"].shape == (3, 2) and out["global_classes"].dtype == np.int16


@pytest.mark.parametrize("model_name", ["test_nfnet", "dm_nfnet_f0"])
def test_folded_weight_standardization_gives_the_same_outputs(model_name: str):
    """test_nfnet has ScaledStdConv2d layers; dm_nfnet_f0 ScaledStdConv2dSame, with dynamic
    (TF 'SAME') padding on its strided convs."""
    from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame

    model = timm.create_model(model_name, pretrained=False, num_classes=7).eval()
    with torch.no_grad():  # gains other than 1, so that the gain is part of what is folded
        for m in model.modules():
            if isinstance(m, ScaledStdConv2d | ScaledStdConv2dSame):
                m.gain.uniform_(0.5, 1.5)
    standardised = sum(isinstance(m, ScaledStdConv2d | ScaledStdConv2dSame)
                       for m in model.modules())
    x = torch.randn(2, 3, 72, 72, generator=torch.Generator().manual_seed(3))  # odd: SAME pads
    unit_gains = copy.deepcopy(model)
    with torch.no_grad():
        before = model(x)
        assert fold_weight_standardization(model) == standardised > 20
        after = model(x)
        for m in unit_gains.modules():
            if isinstance(m, ScaledStdConv2d | ScaledStdConv2dSame):
                m.gain.fill_(1.0)
        control = unit_gains(x)
    assert not any(isinstance(m, ScaledStdConv2d | ScaledStdConv2dSame) for m in model.modules())
    assert not any(hasattr(m, "gain") for m in model.modules() if isinstance(m, nn.Conv2d))
    assert torch.equal(before, after)  # the layer's own arithmetic, once: bit for bit
    # The outputs depend on the gains, so a fold that lost them could not pass the above.
    assert not torch.allclose(before, control, atol=1e-3)


def test_the_runner_folds_its_teacher(checkpoint: Path):
    from timm.layers import ScaledStdConv2d

    from labeler_service.labeling import ModelInput, TeacherRunner

    teacher, spec, _ = build_teacher("test_nfnet", checkpoint, 64)
    pixels = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(4))
    x = ModelInput(spec.mean, spec.std, torch.device("cpu"))(pixels)
    unfolded = teacher.summarise(x, topk=2)
    runner = TeacherRunner(teacher, spec.mean, spec.std, 2, torch.device("cpu"), "fp32")
    assert not any(isinstance(m, ScaledStdConv2d) for m in teacher.modules())
    out = runner(pixels)
    np.testing.assert_allclose(out["lse"], unfolded.lse.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["classes"], unfolded.classes.numpy())


def test_input_size_must_tile_the_stride(checkpoint: Path):
    with pytest.raises(TeacherError, match="not a multiple of test_nfnet's stride 32"):
        build_teacher("test_nfnet", checkpoint, 100)


def _not_checkpoints(tmp_path: Path, checkpoint: Path) -> dict[str, Path]:
    """Files that are not checkpoints, each as a user might put one in the checkpoint root."""
    files = {}

    def put(name: str, data: bytes) -> None:
        files[name] = tmp_path / name
        files[name].write_bytes(data)

    good = checkpoint.read_bytes()
    put("empty.pt", b"")
    put("text.pth", b"this is a README, not weights\n" * 4)
    put("truncated.safetensors", good[:len(good) // 2])
    put("garbage.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"x" * 64)
    put("huge-header.safetensors", b"\xff" * 8 + b"{}")
    torch.save([torch.zeros(2)], tmp_path / "a-list.pt")
    files["a-list.pt"] = tmp_path / "a-list.pt"
    torch.save({"w": torch.zeros(2), "step": "ten"}, tmp_path / "non-tensor.pt")
    files["non-tensor.pt"] = tmp_path / "non-tensor.pt"

    class RunsCode:
        def __reduce__(self):
            return (print, ("this ran",))

    torch.save({"w": RunsCode()}, tmp_path / "runs-code.pt")
    files["runs-code.pt"] = tmp_path / "runs-code.pt"
    return files


def test_anything_that_is_not_a_checkpoint_is_a_teacher_error(tmp_path: Path, checkpoint: Path,
                                                               capsys):
    """Every kind fails with a one-line TeacherError naming the file (issue 13, items 4, 18),
    never a KeyError or a traceback; a pickle that would run code is not run."""
    for name, path in _not_checkpoints(tmp_path, checkpoint).items():
        with pytest.raises(TeacherError) as caught:
            build_teacher("test_nfnet", path, 64)
        message = str(caught.value)
        assert name in message and "\n" not in message and len(message) < 600, (name, message)
    assert "this ran" not in capsys.readouterr().out


def test_the_cheap_check_refuses_what_needs_no_torch_to_refuse(tmp_path: Path, checkpoint: Path):
    from labeler_service.checkpoint_files import checkpoint_problem

    files = _not_checkpoints(tmp_path, checkpoint)
    refused = {name for name, path in files.items() if checkpoint_problem(path)}
    assert refused == {"empty.pt", "text.pth", "truncated.safetensors", "garbage.safetensors",
                       "huge-header.safetensors"}
    assert checkpoint_problem(checkpoint) is None  # the real one passes
    torch.save({"w": torch.zeros(2)}, tmp_path / "fine.pt")
    assert checkpoint_problem(tmp_path / "fine.pt") is None


# -- issue 23: malformed safetensors headers and teacher metadata -------------------------------

BAD_OFFSETS = ["[]", '"ab"', "1e400", "null", "{}", "NaN", "[8, 4]", "[true, 4]", "[0.0, 4.0]"]


def safetensors_with_offsets(path: Path, offsets: str) -> Path:
    """A .safetensors file of one 4-byte tensor whose ``data_offsets`` are the raw JSON
    ``offsets``."""
    header = ('{"w": {"dtype": "F32", "shape": [1], "data_offsets": ' + offsets + "}}").encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    return path


@pytest.mark.parametrize("offsets", BAD_OFFSETS)
def test_malformed_data_offsets_are_a_checkpoint_problem(tmp_path: Path, offsets: str):
    """A3: every malformed ``data_offsets`` is a reason (the API's 422), never an exception."""
    from labeler_service.checkpoint_files import checkpoint_problem

    path = safetensors_with_offsets(tmp_path / "bad.safetensors", offsets)
    assert "'w' has data_offsets" in checkpoint_problem(path)
    with pytest.raises(TeacherError, match=r"bad\.safetensors: not a safetensors file"):
        build_teacher("test_nfnet", path, 64)


def fitted_checkpoint(path: Path, weights: Path, **fields: str) -> Path:
    """``weights`` (a 3-class test_nfnet) with the metadata ``labeler teacher fit`` writes;
    ``fields`` replace values by raw JSON text."""
    from safetensors.torch import load_file, save_file

    from labeler_service.checkpoint_files import FITTED_FORMAT

    meta = {"format": FITTED_FORMAT, "format_version": "1", "model": '"test_nfnet"',
            "class_names": '["a", "b", "c"]', "num_classes": "3", "output_stride": "null",
            "val_permille": "100", "heldout_top1": "0.5", **fields}
    save_file(load_file(str(weights)), str(path), metadata=meta)
    return path


@pytest.mark.parametrize("field,raw,expected", [
    ("class_names", '"notalist"', "a non-empty list of class names"),
    ("class_names", "[1, 2, 3]", "a non-empty list of class names"),
    ("output_stride", "7", "null or one of 8, 16, 32"),
    ("output_stride", "16.0", "null or one of 8, 16, 32"),
    ("input_size", "1e400", "an input size in 32..2048"),
    ("val_permille", '"100"', "a per mille in 0..999"),
    ("heldout_top1", "NaN", r"null or a share in \[0, 1\]"),
    ("num_classes", "8", "'num_classes' is 8 but there are 3 class names"),
    ("model", "null", "a model name"),
])
def test_malformed_teacher_metadata_is_refused_naming_the_field(tmp_path: Path, checkpoint: Path,
                                                                 field: str, raw: str,
                                                                 expected: str):
    """A4: every field is checked, in one place, for the CLI, the workers and the API's cheap
    check alike ("notalist" once read as 8 class names; output stride 7 was used)."""
    from labeler_service.checkpoint_files import checkpoint_problem

    path = fitted_checkpoint(tmp_path / "fitted.safetensors", checkpoint, **{field: raw})
    with pytest.raises(TeacherError, match=f"fitted.safetensors: malformed teacher metadata: "
                                           f".*{expected}") as caught:
        build_teacher("test_nfnet", path, 64)
    assert "\n" not in str(caught.value)
    assert checkpoint_problem(path).startswith("malformed teacher metadata: ")


def test_well_formed_teacher_metadata_is_used(tmp_path: Path, checkpoint: Path):
    path = fitted_checkpoint(tmp_path / "fitted.safetensors", checkpoint, output_stride="16")
    _, spec, grid = build_teacher("test_nfnet", path, 64)
    assert spec.class_names == ("a", "b", "c") and spec.output_stride == 16 and grid == (4, 4)


def test_a_teacher_fitted_for_another_model_is_named_for_every_user(tmp_path: Path,
                                                                     checkpoint: Path):
    """A4: the reason names the model to use, not a CLI option (REST users read it too)."""
    path = fitted_checkpoint(tmp_path / "fitted.safetensors", checkpoint,
                             model='"test_resnet"')
    with pytest.raises(TeacherError) as caught:
        build_teacher("test_nfnet", path, 64)
    message = str(caught.value)
    assert "fitted for model 'test_resnet', not 'test_nfnet'" in message
    assert "label with model 'test_resnet'" in message and "--model" not in message


def test_a_checkpoint_of_another_model_is_one_line_naming_both(tmp_path: Path):
    """A9: not torch's thousands of lines of missing, unexpected and resized keys."""
    other = make_random_checkpoint(tmp_path / "convnext.safetensors", model="test_convnext",
                                   num_classes=3)
    with pytest.raises(TeacherError) as caught:
        build_teacher("test_nfnet", other, 64)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 500, message
    assert message.startswith(f"checkpoint {other} does not fit test_nfnet (")
    assert "weights missing (e.g. 'stem.conv1.weight')" in message
    assert "'head.fc.weight': [3, 64] in the checkpoint, [3, 192] in the model" in message
