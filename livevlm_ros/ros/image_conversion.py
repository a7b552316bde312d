"""sensor_msgs/Image and CompressedImage -> RGB uint8 numpy arrays, with clear errors.

On a ROS 2 install cv_bridge does the conversion. Where it is missing (this repo's pip-only test
machines) the same conversions are done here with numpy and OpenCV: the common raw encodings,
row padding (`step`) honoured, JPEG/PNG decoded. Anything malformed raises ImageConversionError
with the reason, so the node can count and log the drop and keep running.
"""

from __future__ import annotations

import cv2
import numpy as np

try:                                            # a real ROS 2 install
    from cv_bridge import CvBridge
    _BRIDGE = CvBridge()
except Exception:                               # noqa: BLE001 - missing, or the broken PyPI copy
    _BRIDGE = None


class ImageConversionError(ValueError):
    pass


# encoding -> (channels, numpy dtype, OpenCV conversion to RGB or None)
_RAW = {
    "rgb8": (3, np.uint8, None),
    "bgr8": (3, np.uint8, cv2.COLOR_BGR2RGB),
    "rgba8": (4, np.uint8, cv2.COLOR_RGBA2RGB),
    "bgra8": (4, np.uint8, cv2.COLOR_BGRA2RGB),
    "mono8": (1, np.uint8, cv2.COLOR_GRAY2RGB),
    "8uc1": (1, np.uint8, cv2.COLOR_GRAY2RGB),
    "8uc3": (3, np.uint8, cv2.COLOR_BGR2RGB),
    "mono16": (1, np.uint16, cv2.COLOR_GRAY2RGB),
    "16uc1": (1, np.uint16, cv2.COLOR_GRAY2RGB),
}


def to_rgb(msg) -> np.ndarray:
    """Image or CompressedImage message -> HxWx3 uint8 RGB."""
    if hasattr(msg, "encoding"):
        return raw_to_rgb(msg)
    if hasattr(msg, "format"):
        return compressed_to_rgb(msg)
    raise ImageConversionError(f"not an image message: {type(msg).__name__}")


def raw_to_rgb(msg) -> np.ndarray:
    if _BRIDGE is not None:
        try:
            return np.ascontiguousarray(_BRIDGE.imgmsg_to_cv2(msg, desired_encoding="rgb8"))
        except Exception as err:                # noqa: BLE001
            raise ImageConversionError(f"cv_bridge could not convert {msg.encoding!r} image: {err}") from err
    enc = msg.encoding.lower()
    if enc not in _RAW:
        raise ImageConversionError(f"unsupported encoding {msg.encoding!r}; supported: {sorted(_RAW)}")
    channels, dtype, conversion = _RAW[enc]
    h, w, step = msg.height, msg.width, msg.step
    row = w * channels * np.dtype(dtype).itemsize
    if h == 0 or w == 0:
        raise ImageConversionError(f"empty image ({w}x{h})")
    if step < row:
        raise ImageConversionError(f"step {step} is smaller than a row of {w} {enc} pixels ({row} bytes)")
    data = np.frombuffer(memoryview(msg.data), dtype=np.uint8)
    if data.size < step * h:
        raise ImageConversionError(f"data holds {data.size} bytes; {w}x{h} {enc} with step {step} needs {step * h}")
    pixels = data[: step * h].reshape(h, step)[:, :row]
    img = pixels.copy().view(dtype)
    if np.dtype(dtype).itemsize > 1:
        if bool(msg.is_bigendian) != (np.little_endian is False):
            img = img.byteswap()
        img = (img >> 8).astype(np.uint8)               # 16-bit depth/mono: keep the high byte
    img = img.reshape(h, w, channels) if channels > 1 else img.reshape(h, w)
    return np.ascontiguousarray(img if conversion is None else cv2.cvtColor(img, conversion))


def compressed_to_rgb(msg) -> np.ndarray:
    data = np.frombuffer(memoryview(msg.data), dtype=np.uint8)
    if data.size == 0:
        raise ImageConversionError("compressed image has no data")
    # OpenCV decodes a truncated JPEG into a partly grey image with only a warning: check the
    # start/end-of-image markers ourselves.
    if data[:2].tobytes() == b"\xff\xd8" and np.trim_zeros(data[-16:], "b")[-2:].tobytes() != b"\xff\xd9":
        raise ImageConversionError(f"JPEG image ({data.size} bytes) is truncated: no end-of-image marker")
    try:
        img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error as err:
        raise ImageConversionError(f"could not decode {msg.format!r} image: {err}") from err
    if img is None:
        raise ImageConversionError(f"could not decode {msg.format!r} image ({data.size} bytes): corrupt or truncated")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

