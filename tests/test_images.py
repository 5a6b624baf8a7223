"""folk_nb.images: the one PNG encoder (decoded back with PIL, an independent decoder) and the grey mapping."""
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from folk_nb.images import gray_image, to_png_data_uri, to_uint8_image


def decode(uri):
    "A PNG data URI back to a numpy array, with PIL."
    assert uri.startswith('data:image/png;base64,')
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(',', 1)[1]))))


@pytest.mark.parametrize('shape', [(40, 48, 3), (33, 17), (1, 1, 3), (2, 300)])
@pytest.mark.parametrize('level', [0, 1, 6, 9])
def test_png_is_lossless(shape, level):
    a = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)   # random: the Up filter wraps mod 256
    np.testing.assert_array_equal(decode(to_png_data_uri(a, level)), a)


def test_png_of_a_non_contiguous_array_and_of_tensors():
    a = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode(to_png_data_uri(a[::2, ::-1])), a[::2, ::-1])
    x = torch.rand(3, 12, 10)
    np.testing.assert_array_equal(decode(to_png_data_uri(x)), to_uint8_image(x))            # float (C, H, W) in [0, 1]
    np.testing.assert_array_equal(decode(to_png_data_uri(x[0], 0)), to_uint8_image(x[0]))   # (H, W): drawn as RGB


def test_png_compression_levels_trade_size():
    a = np.zeros((64, 64), np.uint8); a[16:48, 16:48] = 255                        # a mask: compresses well
    sizes = [len(to_png_data_uri(a, level)) for level in (0, 1, 9)]
    assert sizes[0] > 4 * sizes[1] and sizes[1] >= sizes[2], sizes


def test_png_and_gray_image_reject_bad_input():
    with pytest.raises(ValueError, match='uint8'): to_png_data_uri(np.zeros((4, 4)))
    with pytest.raises(ValueError, match='uint8'): to_png_data_uri(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(TypeError, match='numpy array'): to_png_data_uri([[0, 1]])
    with pytest.raises(ValueError, match='level'): to_png_data_uri(np.zeros((4, 4), np.uint8), level=10)
    with pytest.raises(ValueError, match='level'): to_png_data_uri(np.zeros((4, 4), np.uint8), level=True)
    with pytest.raises(ValueError, match='2-D'): gray_image(np.zeros((2, 2, 2)))
    m = np.array([[-1.0, 0.0], [0.5, 3.0]])
    np.testing.assert_array_equal(gray_image(m, 0.0, 1.0), [[0, 0], [128, 255]])
    np.testing.assert_array_equal(gray_image(m), [[0, 64], [96, 255]])            # its own range: -1 black, 3 white
