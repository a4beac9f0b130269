"""Pixel normalisation on the device: the stream yields uint8, the model wants mean/std floats."""

from __future__ import annotations

from collections.abc import Sequence

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize:
    """uint8 ``[B, 3, H, W]`` on the host -> ``(x - mean) / std`` as float on ``device``.

    The copy moves uint8 (a quarter of the float bytes) and the arithmetic runs on the device.
    On CUDA the result is channels-last, the layout the models run in there.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device):
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.memory_format = (torch.channels_last if device.type == "cuda"
                              else torch.contiguous_format)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float()
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)
