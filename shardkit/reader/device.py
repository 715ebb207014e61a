"""Hand a uint8 batch to the accelerator and finish preprocessing there.

The CPU only copies bytes: the uint8 NHWC batch crosses the bus (4× fewer bytes than
float32), and the float conversion, scaling, mean/std normalisation and the NCHW view happen
on the device. A batch of stored JPEG files (``ShardLoader(..., decode="device")``) is decoded
there too: by nvJPEG through torchvision on a CUDA device, else on the CPU
(`shardkit.reader.decode`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeGuard

import numpy as np

from shardkit.errors import ConfigError, require
from shardkit.reader.decode import decode

torch: Any = require("torch", "torch")

__all__ = ["to_device"]


def to_device(batch: dict[str, Any], device: Any, *, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None, channels_last: bool = True,
              scale: float = 1 / 255, dtype: Any = None) -> dict[str, Any]:
    """Copy `batch` to `device` (non-blocking) and turn ``image`` into normalised floats.

    image: uint8 [B,H,W,C] → `dtype` (default float32) [B,C,H,W], computed on the device as
    ``(x * scale - mean) / std`` (mean/std per channel, on the 0-1 scale when scale=1/255;
    omit them to only rescale). With ``channels_last`` (default) the result keeps the NHWC
    memory layout (``torch.channels_last``), which convolutions on GPUs prefer; otherwise it
    is made contiguous NCHW. Other tensors are moved as they are; lists pass through.

    When ``image`` is a list of 1-D uint8 tensors (the JPEG files of a
    ``decode="device"`` loader), they are decoded first: with torchvision on a CUDA device, in
    one batched nvJPEG call on the device; otherwise on the CPU by `shardkit.reader.decode`
    (the same pixels as a ``decode="cpu"`` loader gives, but in the calling thread). nvJPEG and libjpeg may
    differ by a unit or so on some pixels.

    When the batch holds ``augment`` rows (a loader given ``augment=Augment(...)``), the
    image is resampled, flipped and colour-jittered per sample on the device first (one
    ``grid_sample`` pass over the batch; see shardkit.reader.augment_apply), giving the
    Augment's output size; its ``rescale``, when set, replaces `scale`.
    """
    dtype = dtype or torch.float32
    device = torch.device(device)
    out: dict[str, Any] = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[name] = value.to(device, non_blocking=True)
        else:
            out[name] = value
    image = out.get("image")
    if _encoded(image):
        image = _decode(image, device)
    if isinstance(image, torch.Tensor):
        _check_stats(mean, std, int(image.shape[-1]))
    if isinstance(image, torch.Tensor) and isinstance(batch.get("augment"), torch.Tensor):
        from shardkit.reader.augment_apply import apply_augment

        # The rows stay on the CPU copy: reading their sizes and levels there needs no sync.
        x = apply_augment(image, batch["augment"], scale=scale, mean=mean, std=std).to(dtype)
        out["image"] = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
    elif isinstance(image, torch.Tensor):
        x = image.permute(0, 3, 1, 2).to(dtype)  # an NCHW view of NHWC memory: channels_last
        x = x.mul_(scale)
        if mean is not None:
            x = x.sub_(torch.as_tensor(mean, dtype=dtype, device=device).view(1, -1, 1, 1))
        if std is not None:
            x = x.div_(torch.as_tensor(std, dtype=dtype, device=device).view(1, -1, 1, 1))
        out["image"] = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
    return out


def _check_stats(mean: Sequence[float] | None, std: Sequence[float] | None, channels: int) -> None:
    for name, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) not in (1, channels):
            raise ConfigError(f"to_device: {name} has {len(values)} values for images of "
                              f"{channels} channel(s); give 1 or {channels}")


def _encoded(image: Any) -> TypeGuard[list[Any]]:
    return isinstance(image, list) and bool(image) and all(
        isinstance(t, torch.Tensor) and t.dim() == 1 and t.dtype == torch.uint8 for t in image)


def _decode(files: list[Any], device: Any) -> Any:
    """uint8 [B,H,W,C] on `device` from B JPEG files (1-D uint8 tensors)."""
    if device.type == "cuda":
        try:
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError:
            pass
        else:
            decoded = decode_jpeg([t.cpu() for t in files], mode=ImageReadMode.UNCHANGED,
                                  device=device)  # a list of [C,H,W]
            return torch.stack(decoded).permute(0, 2, 3, 1)
    arrays = [decode(data.cpu().numpy()) for data in files]
    return torch.from_numpy(np.stack(arrays)).to(device, non_blocking=True)
