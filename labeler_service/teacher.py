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
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import ImageNetInfo
from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame
from torch import nn

from labeler_service.checkpoint_files import TeacherError, checkpoint_problem, fitted_metadata
from storage import Dataset, TeacherSpec


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
    problem = checkpoint_problem(Path(checkpoint))
    if problem:
        raise TeacherError(f"checkpoint {checkpoint}: {problem}")
    # timm's loader handles safetensors, {'state_dict': ...}/{'model': ...} wrappers and the
    # 'module.' prefix of DDP checkpoints, and loads with weights_only=True (a pickle that
    # would run code is refused).
    try:
        state = timm.models.load_state_dict(str(checkpoint))
    except Exception as e:  # torch and safetensors raise many kinds for a bad file
        raise TeacherError(f"checkpoint {checkpoint} cannot be loaded as a state dict "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not state:
        raise TeacherError(f"checkpoint {checkpoint} holds a {type(state).__name__}, "
                           "not a state dict")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise TeacherError(f"checkpoint {checkpoint}: {str(bad)[:60]!r} is a "
                           f"{type(state[bad]).__name__}, not a tensor")
    return state


def fit_summary(checkpoint: Path | None) -> dict[str, Any] | None:
    """What a label set records of its teacher's fit (its ``teacher_fit`` attr): the dataset
    and held-out split it was fitted on and its held-out accuracy; None for other teachers."""
    meta = fitted_metadata(Path(checkpoint)) if checkpoint is not None else None
    if meta is None:
        return None
    keys = ("dataset", "dataset_fingerprint", "val_permille", "train_images", "heldout_images",
            "heldout_top1", "heldout_top5", "head_only", "input_size", "created_at")
    return {k: meta.get(k) for k in keys}


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
        name = type(self.model).__name__
        try:
            features = self.forward_features(x)
            expected = self.model(x).float()
        except Exception as e:  # a model that cannot take this input at all
            raise TeacherError(f"{name} cannot run at input size {input_size}: "
                               f"{type(e).__name__}: {e}") from None
        if features.ndim != 4:
            raise TeacherError(f"{name}: its features are {features.ndim}-D, not a [B, C, H, W] "
                               "map; its head is not global average pool + linear")
        dense = self(x)
        error = (dense.mean(dim=(2, 3)) - expected).abs().max().item()
        scale = max(1.0, expected.abs().max().item())
        if error > atol * scale:
            raise TeacherError(
                f"{name}: the mean of the dense logits differs from the "
                f"model's output by {error:.3g}; its head is not global average pool + linear")
        return int(dense.shape[2]), int(dense.shape[3])


def fold_weight_standardization(model: nn.Module) -> int:
    """Replace every scaled weight-standardised conv of ``model`` (NFNet's ``ScaledStdConv2d``
    and ``ScaledStdConv2dSame``) by a plain conv holding its standardised weight; returns how
    many were replaced.

    timm's layers standardise their weights in every forward: for NFNet-F6 that is a pass over
    its 438 M parameters per batch, which inference, whose weights never change, need not pay.
    The standardised weight is computed by the layer's own arithmetic, once, so in float32 the
    folded model's outputs are the unfolded model's, bit for bit. For inference only: the
    folded model has no ``gain`` parameters and its state dict is no longer a timm checkpoint.
    """
    folded = 0
    for parent in list(model.modules()):
        for name, conv in list(parent.named_children()):
            if not isinstance(conv, ScaledStdConv2d | ScaledStdConv2dSame):
                continue
            with torch.no_grad():
                weight = F.batch_norm(conv.weight.reshape(1, conv.out_channels, -1), None, None,
                                      weight=(conv.gain * conv.scale).view(-1), training=True,
                                      momentum=0.0, eps=conv.eps).reshape_as(conv.weight)
            # SAME padding that depends on the input's size stays dynamic (timm's Conv2dSame);
            # a fixed padding is nn.Conv2d's own.
            plain_type = Conv2dSame if getattr(conv, "same_pad", False) else nn.Conv2d
            plain = plain_type(conv.in_channels, conv.out_channels, conv.kernel_size,
                               stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                               groups=conv.groups, bias=conv.bias is not None,
                               device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                plain.weight.copy_(weight)
                if conv.bias is not None:
                    plain.bias.copy_(conv.bias)
            plain.train(conv.training)
            setattr(parent, name, plain)
            folded += 1
    return folded


def imagenet_class_names(num_classes: int) -> tuple[str, ...]:
    if num_classes != 1000:
        return ()
    info = ImageNetInfo("imagenet-1k")
    return tuple(info.index_to_description(i) for i in range(num_classes))


def imagenet_synsets() -> tuple[str, ...]:
    """The WordNet ids (n01440764, ...) an ImageNet-1k train folder is named by, in class order."""
    return tuple(ImageNetInfo("imagenet-1k").label_names())


def build_teacher(model_name: str, checkpoint: Path | None, input_size: int,
                  device: str | torch.device = "cpu",
                  class_names: tuple[str, ...] | None = None,
                  precision: str = "fp32", output_stride: int | None = None,
                  ) -> tuple[DenseTeacher, TeacherSpec, tuple[int, int]]:
    """Create the timm model, load the local checkpoint, check it, and describe it.

    ``num_classes`` comes from the checkpoint's classifier. Without a checkpoint the weights are
    random (for tests and speed measurements). ``precision`` is the backbone's autocast dtype,
    recorded in the spec because it changes the labels. A checkpoint from ``labeler teacher fit``
    brings its class names (unless ``class_names`` is given) and its output stride (unless
    ``output_stride`` is given), and must be for ``model_name``. ``output_stride`` dilates the
    model's last stages (timm's option) for a denser grid. Returns (teacher, spec, grid).
    """
    if model_name not in timm.list_models():
        raise TeacherError(f"unknown timm model {model_name!r}")
    num_classes, state, sha256 = 1000, None, None
    if checkpoint is not None:
        state = load_state_dict(Path(checkpoint))  # checks the file, and its metadata if fitted
        fitted = fitted_metadata(Path(checkpoint))
        if fitted is not None:
            if fitted["model"] != model_name:
                # Worded for the CLI and the REST API alike: each spells "model" its own way.
                raise TeacherError(f"checkpoint {checkpoint} was fitted for model "
                                   f"{fitted['model']!r}, not {model_name!r}: label with model "
                                   f"{fitted['model']!r}")
            class_names = class_names or tuple(fitted["class_names"])
            output_stride = output_stride or fitted.get("output_stride")
        num_classes = classifier_outputs(state, model_name, Path(checkpoint))
        sha256 = file_sha256(Path(checkpoint))
    model = create_dense_model(model_name, num_classes, output_stride)
    if state is not None:
        load_weights(model, state, model_name, Path(checkpoint))
    stride = model.feature_info[-1]["reduction"] if getattr(model, "feature_info", None) else 1
    if input_size % stride:
        raise TeacherError(f"input size {input_size} is not a multiple of {model_name}'s "
                           f"stride {stride}: the label grid would not tile the image exactly")
    if class_names and len(class_names) != num_classes:
        raise TeacherError(f"{len(class_names)} class names for a teacher with {num_classes} "
                           "outputs")
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
        output_stride=output_stride,
    )
    return teacher, spec, grid


def classifier_outputs(state: dict[str, torch.Tensor], model_name: str,
                       checkpoint: Path) -> int:
    """How many classes the checkpoint's classifier has (the rows of its head's weight)."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    key = f"{(cfg.classifier if cfg else None) or 'head.fc'}.weight"
    if key not in state or state[key].ndim != 2:
        raise TeacherError(f"checkpoint {checkpoint} has no {key!r} matrix: is it a {model_name} "
                           "state dict?")
    return int(state[key].shape[0])


def weights_mismatch(model: nn.Module, state: dict[str, torch.Tensor],
                     skip: str | None = None) -> str | None:
    """Why ``state`` does not fit ``model`` (weights missing, unexpected or of another shape),
    in one line with a first example of each; None if it fits. Keys starting with ``skip`` (a
    head about to be replaced) are left out on both sides. torch's own error lists every key,
    thousands of lines for a checkpoint of another model."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items()}
    if skip:
        own = {k: v for k, v in own.items() if not k.startswith(skip)}
        given = {k: v for k, v in given.items() if not k.startswith(skip)}
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    reshaped = [k for k in own if k in given and own[k] != given[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights missing (e.g. {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} weights the model does not have (e.g. {unexpected[0]!r})")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} weights of another shape (e.g. {k!r}: {list(given[k])} in "
                     f"the checkpoint, {list(own[k])} in the model)")
    return "; ".join(parts) or None


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], model_name: str,
                 checkpoint: Path) -> None:
    """Load ``state`` into ``model`` exactly, or a one-line TeacherError naming both."""
    mismatch = weights_mismatch(model, state)
    if mismatch is None:
        try:
            model.load_state_dict(state, strict=True)
            return
        except RuntimeError as e:  # anything the comparison above does not foresee
            mismatch = str(e).strip().splitlines()[0][:300]
    raise TeacherError(f"checkpoint {checkpoint} does not fit {model_name} ({mismatch}): is it a "
                       "checkpoint of another model?")


def create_dense_model(model_name: str, num_classes: int,
                       output_stride: int | None = None) -> nn.Module:
    """The timm model, random weights, dilated to ``output_stride`` when one is given."""
    kwargs = {} if output_stride is None else {"output_stride": output_stride}
    try:
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise TeacherError(f"{model_name} cannot run at output stride {output_stride}: "
                           f"{e}") from None


def label_space_problem(dataset: Dataset, teacher: TeacherSpec) -> str | None:
    """Why the teacher's outputs are not the dataset's ImageFolder classes, or None when they are
    the same label space (or the dataset has no classes to compare with).

    Names decide when both sides have them (an ImageNet-1k teacher's descriptions match the
    WordNet ids its train folders are named by); otherwise the counts must agree.
    """
    ours = dataset.class_names
    if not ours:
        return None
    if len(ours) != teacher.num_classes:
        return (f"dataset {dataset.name!r} has {len(ours)} classes (its image folders) but the "
                f"teacher has {teacher.num_classes} outputs")
    theirs = teacher.class_names
    if not theirs or tuple(theirs) == tuple(ours):
        return None
    if len(ours) == 1000 and tuple(theirs) == imagenet_class_names(1000) \
            and tuple(ours) == imagenet_synsets():
        return None
    differ = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
    return (f"dataset {dataset.name!r} and the teacher name their classes differently (class "
            f"{differ} is {ours[differ]!r} in the dataset, {theirs[differ]!r} for the teacher)")
