"""The dense-label teacher: a timm classifier whose head is global average pool + linear.

Because the pool is a mean and the head is linear, applying the linear layer at every location of
the feature map gives a dense logit map whose spatial mean is exactly the image-level logits.
``DenseTeacher`` computes that map and checks the identity against the model's own output when it
is loaded, so a model with any other head (attention pool, max pool, MLP) is refused, not
silently mislabeled.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import ImageNetInfo
from torch import nn

from storage import TeacherSpec

# The NFNet family the project defaults to; any timm model with an avg-pool + linear head works.
NFNET_MODELS = ("dm_nfnet_f0", "dm_nfnet_f1", "dm_nfnet_f2", "dm_nfnet_f3", "dm_nfnet_f4",
                "dm_nfnet_f5", "dm_nfnet_f6", "nfnet_l0", "eca_nfnet_l0", "eca_nfnet_l1",
                "eca_nfnet_l2", "test_nfnet")


class TeacherError(ValueError):
    """The model or checkpoint cannot serve as a dense teacher."""


@dataclass
class TeacherOutput:
    """Top-K summary of a batch of dense maps (torch tensors on the teacher's device)."""

    logits: torch.Tensor  # float32 [B, K, H, W], descending along K
    classes: torch.Tensor  # int64 [B, K, H, W]
    lse: torch.Tensor  # float32 [B, H, W]
    global_logits: torch.Tensor  # float32 [B, K]
    global_classes: torch.Tensor  # int64 [B, K]


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A timm state dict from a .pth/.pt/.bin (optionally wrapped) or .safetensors file."""
    if not Path(checkpoint).is_file():
        raise TeacherError(f"checkpoint {checkpoint} does not exist")
    # timm's loader handles safetensors, {'state_dict': ...}/{'model': ...} wrappers and the
    # 'module.' prefix of DDP checkpoints, and loads with weights_only=True.
    return timm.models.load_state_dict(str(checkpoint))


class DenseTeacher(nn.Module):
    """Wraps a timm classifier; ``forward`` returns dense float32 logits [B, C, H, W]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        classifier = model.get_classifier()
        if not isinstance(classifier, nn.Linear):
            raise TeacherError(f"{type(model).__name__}: the classifier is "
                               f"{type(classifier).__name__}, not a linear layer")
        self.model = model
        self.classifier = classifier

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(x)
        # The head runs in float32 even when the backbone runs under autocast: its outputs are
        # the stored labels. F.linear over channels-last features is the same matmul as the
        # model's own nn.Linear, so the dense/global identity holds to float32 rounding.
        with torch.autocast(features.device.type, enabled=False):
            dense = F.linear(features.float().permute(0, 2, 3, 1),
                             self.classifier.weight.float(),
                             None if self.classifier.bias is None else self.classifier.bias.float())
        return dense.permute(0, 3, 1, 2)

    @torch.no_grad()
    def summarise(self, x: torch.Tensor, topk: int) -> TeacherOutput:
        dense = self(x)  # float32
        with torch.autocast(dense.device.type, enabled=False):
            logits, classes = dense.topk(topk, dim=1)
            global_logits, global_classes = dense.mean(dim=(2, 3)).topk(topk, dim=1)
            return TeacherOutput(logits, classes, dense.logsumexp(dim=1), global_logits,
                                 global_classes)

    @torch.no_grad()
    def check_dense_invariant(self, input_size: int, atol: float = 1e-3) -> tuple[int, int]:
        """Mean of the dense map == the model's own logits; returns the grid (H, W)."""
        param = next(self.model.parameters())
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, input_size, input_size, generator=gen).to(param.device, param.dtype)
        dense = self(x)
        expected = self.model(x).float()
        error = (dense.mean(dim=(2, 3)) - expected).abs().max().item()
        scale = max(1.0, expected.abs().max().item())
        if error > atol * scale:
            raise TeacherError(
                f"{type(self.model).__name__}: the mean of the dense logits differs from the "
                f"model's output by {error:.3g}; its head is not global average pool + linear")
        return int(dense.shape[2]), int(dense.shape[3])


def imagenet_class_names(num_classes: int) -> tuple[str, ...]:
    if num_classes != 1000:
        return ()
    info = ImageNetInfo("imagenet-1k")
    return tuple(info.index_to_description(i) for i in range(num_classes))


def build_teacher(model_name: str, checkpoint: Path | None, input_size: int,
                  device: str | torch.device = "cpu",
                  class_names: tuple[str, ...] | None = None,
                  precision: str = "fp32") -> tuple[DenseTeacher, TeacherSpec, tuple[int, int]]:
    """Create the timm model, load the local checkpoint, check it, and describe it.

    ``num_classes`` comes from the checkpoint's classifier. Without a checkpoint the weights are
    random (for tests and speed measurements). ``precision`` is the backbone's autocast dtype,
    recorded in the spec because it changes the labels. Returns (teacher, spec, grid).
    """
    if model_name not in timm.list_models():
        raise TeacherError(f"unknown timm model {model_name!r}")
    num_classes, state, sha256 = 1000, None, None
    if checkpoint is not None:
        state = load_state_dict(Path(checkpoint))
        cfg_classifier = timm.models.get_pretrained_cfg(model_name)
        head = (cfg_classifier.classifier if cfg_classifier else None) or "head.fc"
        key = f"{head}.weight"
        if key not in state:
            raise TeacherError(f"checkpoint {checkpoint} has no {key!r}: is it a {model_name} "
                               "state dict?")
        num_classes = int(state[key].shape[0])
        sha256 = file_sha256(Path(checkpoint))
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise TeacherError(f"checkpoint {checkpoint} does not fit {model_name}: {e}") from None
    stride = model.feature_info[-1]["reduction"] if getattr(model, "feature_info", None) else 1
    if input_size % stride:
        raise TeacherError(f"--input-size {input_size} is not a multiple of {model_name}'s "
                           f"stride {stride}: the label grid would not tile the image exactly")
    model.eval().to(device)
    teacher = DenseTeacher(model).eval()
    grid = teacher.check_dense_invariant(input_size)

    data_cfg = timm.data.resolve_data_config({}, model=model)
    spec = TeacherSpec(
        model=model_name,
        checkpoint_sha256=sha256,
        num_classes=num_classes,
        input_size=input_size,
        class_names=tuple(class_names) if class_names else imagenet_class_names(num_classes),
        resize="squash",
        interpolation=data_cfg.get("interpolation", "bicubic"),
        mean=tuple(float(v) for v in data_cfg["mean"]),
        std=tuple(float(v) for v in data_cfg["std"]),
        precision=precision,
    )
    return teacher, spec, grid
