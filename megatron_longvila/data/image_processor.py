"""SigLIP's image preprocessing, reproduced exactly: (pad to square,) resize, rescale, normalize.

SigLIP (the vision tower LongVILA uses) resizes to `size x size` with PIL's bicubic filter on 8-bit
pixels, rescales by 1/255 and normalizes with mean = std = 0.5 per channel. VILA's "pad" aspect mode first
pastes the image centered on a square canvas of the mean colour (int(0.5 * 255) = 127), so nothing is
stretched. The "pil" path gives the reference numbers bit for bit; the "torch" path runs where the frames
are (a CUDA tensor from the GPU decoder stays on the GPU) and matches to within a few 1e-2 (PIL rounds the
resized picture to 8 bits, torch does not).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

MODES = ("pad", "resize")


class SiglipImageProcessor:
    """uint8 RGB frames [n, H, W, 3] (a tensor, an array, or a list of PIL images) -> float32 [n, 3, size, size].

    Args:
        size: output side length (384 for siglip-so400m-patch14-384).
        mode: "pad" (VILA: pad to a square with the mean colour, then resize) or "resize" (stretch).
        mean, std: per-channel normalization; SigLIP uses 0.5 for both.
        backend: "pil" (exact SigLIP numbers, CPU) or "torch" (any device, antialiased bicubic).
    """

    def __init__(
        self,
        size: int = 384,
        mode: str = "pad",
        *,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        backend: str = "pil",
    ):
        if mode not in MODES:
            raise ValueError(f"SiglipImageProcessor: mode must be one of {MODES}, got {mode!r}")
        if backend not in ("pil", "torch"):
            raise ValueError(f"SiglipImageProcessor: backend must be 'pil' or 'torch', got {backend!r}")
        if size < 1:
            raise ValueError(f"SiglipImageProcessor: size must be >= 1, got {size}")
        self.size = int(size)
        self.mode = mode
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.backend = backend
        # VILA's expand2square fills with tuple(int(x * 255) for x in image_mean).
        self.fill = tuple(int(m * 255) for m in self.mean)

    def __call__(self, images) -> torch.Tensor:
        frames = _as_uint8_frames(images)
        if self.backend == "torch":
            return self._torch(frames)
        out = np.empty((len(frames), 3, self.size, self.size), dtype=np.float32)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        for i, frame in enumerate(frames):
            arr = frame.cpu().numpy() if isinstance(frame, torch.Tensor) else frame
            if self.mode == "pad":
                arr = pad_to_square(arr, self.fill)
            resized = _pil_resize(arr, self.size)
            # Rescale in float64 then cast, normalize in float32: the order of SigLIP's reference processor.
            x = (resized.astype(np.float64) * (1.0 / 255.0)).astype(np.float32).transpose(2, 0, 1)
            out[i] = (x - mean) / std
        return torch.from_numpy(out)

    def _torch(self, frames) -> torch.Tensor:
        if isinstance(frames, torch.Tensor):
            batch = [frames[i] for i in range(frames.shape[0])]
        else:
            batch = [torch.as_tensor(np.ascontiguousarray(f)) for f in frames]
        outs = []
        for f in batch:
            if self.mode == "pad":
                f = pad_to_square(f, self.fill)
            x = f.permute(2, 0, 1)[None].float()
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
            outs.append(x[0].clamp_(0, 255))
        x = torch.stack(outs) * (1.0 / 255.0) if outs else torch.empty((0, 3, self.size, self.size))
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).float()


def pad_to_square(frame, fill: Sequence[int]):
    """Center `frame` [H, W, 3] on a square canvas of colour `fill` (VILA's expand2square).

    The offset is (side - short) // 2, as PIL's paste in VILA places it.
    """
    h, w = frame.shape[0], frame.shape[1]
    if h == w:
        return frame
    side = max(h, w)
    if isinstance(frame, torch.Tensor):
        canvas = torch.empty((side, side, 3), dtype=frame.dtype, device=frame.device)
        canvas[:] = torch.tensor(fill, dtype=frame.dtype, device=frame.device)
    else:
        canvas = np.empty((side, side, 3), dtype=frame.dtype)
        canvas[:] = np.asarray(fill, dtype=frame.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = frame
    return canvas


def _pil_resize(arr: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    img = Image.fromarray(np.ascontiguousarray(arr))
    return np.asarray(img.resize((size, size), resample=Image.BICUBIC))


def _as_uint8_frames(images):
    """Accept a uint8 tensor/array [n, H, W, 3] or [H, W, 3], or a list of PIL images / arrays."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"SiglipImageProcessor: expected [n, H, W, 3] RGB frames, got shape {tuple(images.shape)}")
        if images.dtype not in (torch.uint8, np.uint8):
            raise ValueError(f"SiglipImageProcessor: expected uint8 pixels, got {images.dtype}")
        return images
    frames = []
    for im in images:
        if hasattr(im, "convert"):  # PIL image
            im = np.asarray(im.convert("RGB"))
        elif isinstance(im, torch.Tensor):
            im = im.cpu().numpy()
        im = np.asarray(im)
        if im.ndim != 3 or im.shape[-1] != 3 or im.dtype != np.uint8:
            raise ValueError(f"SiglipImageProcessor: expected uint8 [H, W, 3] images, got {im.dtype} {im.shape}")
        frames.append(im)
    return frames
