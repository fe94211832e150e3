import numpy as np
import pytest
import torch
from PIL import Image

from megatron_longvila.data.image_processor import SiglipImageProcessor, pad_to_square


def _frames():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 30, 50, 3), dtype=torch.uint8, generator=g)


def test_resize_mode_is_siglip_arithmetic():
    x = _frames()
    out = SiglipImageProcessor(size=16, mode="resize")(x)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    # Reference written out: PIL bicubic to 16x16, /255, (v - 0.5) / 0.5.
    ref = np.asarray(Image.fromarray(x[1].numpy()).resize((16, 16), resample=Image.BICUBIC)).astype(np.float64) / 255.0
    ref = ((ref.astype(np.float32) - 0.5) / 0.5).transpose(2, 0, 1)
    assert torch.equal(out[1], torch.from_numpy(ref))


def test_flat_colour_values():
    x = torch.full((1, 8, 8, 3), 255, dtype=torch.uint8)
    x[..., 1] = 0
    x[..., 2] = 51
    out = SiglipImageProcessor(size=4, mode="resize")(x)
    assert torch.allclose(out[0, 0], torch.ones(4, 4))
    assert torch.allclose(out[0, 1], -torch.ones(4, 4))
    assert torch.allclose(out[0, 2], torch.full((4, 4), 51 / 255 * 2 - 1))


def test_pad_mode_pads_with_mean_colour_centered():
    x = torch.full((1, 10, 20, 3), 255, dtype=torch.uint8)  # wide white image
    sq = pad_to_square(x[0], (127, 127, 127))
    assert sq.shape == (20, 20, 3)
    assert (sq[:5] == 127).all() and (sq[15:] == 127).all() and (sq[5:15] == 255).all()
    out = SiglipImageProcessor(size=20, mode="pad")(x)  # size equals the square: no resampling
    assert torch.allclose(out[0, :, 0], torch.full((3, 20), 127 / 255 * 2 - 1))
    assert torch.allclose(out[0, :, 10], torch.ones(3, 20))
    # An odd difference puts the extra row below, as PIL's paste at (side - h) // 2 does.
    assert pad_to_square(torch.zeros(3, 6, 3, dtype=torch.uint8), (1, 1, 1))[:, :, 0].tolist()[1] == [0] * 6


def test_pil_images_and_arrays_accepted():
    x = _frames()
    proc = SiglipImageProcessor(size=24)
    a = proc(x)
    b = proc([Image.fromarray(f.numpy()) for f in x])
    c = proc(x.numpy())
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("mode", ["pad", "resize"])
def test_torch_backend_close_to_pil(mode):
    x = _frames()
    a = SiglipImageProcessor(size=32, mode=mode)(x)
    b = SiglipImageProcessor(size=32, mode=mode, backend="torch")(x)
    assert (a - b).abs().max() < 0.06  # stated tolerance: 8-bit rounding of the resized picture


def test_bad_input_errors():
    proc = SiglipImageProcessor(size=8)
    with pytest.raises(ValueError):
        proc(torch.zeros(1, 8, 8, 4, dtype=torch.uint8))
    with pytest.raises(ValueError):
        proc(torch.zeros(1, 8, 8, 3, dtype=torch.float32))
    with pytest.raises(ValueError):
        SiglipImageProcessor(mode="crop")
