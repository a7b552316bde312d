"""ROS image messages -> RGB arrays, exactly, and clear errors for malformed ones."""

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image

from livevlm_ros.ros.image_conversion import ImageConversionError, to_rgb

RGB = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)


def raw(encoding, pixels, step=None, pad=0):
    h, w = pixels.shape[:2]
    row = pixels.reshape(h, -1)
    row = np.concatenate([row, np.zeros((h, pad), row.dtype)], axis=1) if pad else row
    return Image(height=h, width=w, encoding=encoding, step=step or row.shape[1],
                 data=row.tobytes())


@pytest.mark.parametrize("encoding,pixels", [
    ("rgb8", RGB), ("bgr8", RGB[..., ::-1]), ("rgba8", np.dstack([RGB, np.full(RGB.shape[:2], 255, np.uint8)])),
    ("bgra8", np.dstack([RGB[..., ::-1], np.zeros(RGB.shape[:2], np.uint8)])),
])
def test_colour_encodings_are_exact(encoding, pixels):
    assert np.array_equal(to_rgb(raw(encoding, np.ascontiguousarray(pixels))), RGB)


def test_row_padding_is_honoured():
    assert np.array_equal(to_rgb(raw("rgb8", RGB, step=5 * 3 + 7, pad=7)), RGB)


def test_mono_becomes_grey_rgb():
    grey = RGB[..., 0]
    out = to_rgb(raw("mono8", np.ascontiguousarray(grey)))
    assert out.shape == (6, 5, 3) and np.array_equal(out[..., 1], grey)


def test_jpeg_decodes():
    ok, jpg = cv2.imencode(".png", cv2.cvtColor(RGB, cv2.COLOR_RGB2BGR))
    assert np.array_equal(to_rgb(CompressedImage(format="png", data=jpg.tobytes())), RGB)


@pytest.mark.parametrize("msg,match", [
    (raw("32FC1", np.zeros((4, 4, 4), np.uint8)), "unsupported encoding"),
    (Image(height=4, width=4, encoding="rgb8", step=12, data=bytes(20)), "needs 48"),
    (Image(height=4, width=4, encoding="rgb8", step=5, data=bytes(48)), "step 5"),
    (Image(height=0, width=4, encoding="rgb8", step=12, data=b""), "empty"),
    (CompressedImage(format="jpeg", data=b""), "no data"),
    (CompressedImage(format="jpeg", data=b"not an image at all"), "corrupt"),
])
def test_malformed_messages_raise_clear_errors(msg, match):
    with pytest.raises(ImageConversionError, match=match):
        to_rgb(msg)


def test_truncated_jpeg_is_refused():
    ok, jpg = cv2.imencode(".jpg", np.full((64, 64, 3), 100, np.uint8))
    data = jpg.tobytes()
    assert to_rgb(CompressedImage(format="jpeg", data=data)).shape == (64, 64, 3)
    with pytest.raises(ImageConversionError, match="truncated"):
        to_rgb(CompressedImage(format="jpeg", data=data[: len(data) * 2 // 3]))

