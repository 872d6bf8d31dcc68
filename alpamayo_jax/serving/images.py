"""Encoded camera images to RGB arrays (Pillow and numpy): JPEG, PNG, WebP and BMP bytes, plain
base64 strings and `data:image/...;base64,` URLs. Every error is an `ImageError` whose message
starts with the image's name (`images[3]`, say)."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import numpy as np
from PIL import Image

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# Largest accepted image, in pixels: over 8K (7680 x 4320 = 33 Mpx) with room to spare, far below
# what would exhaust memory when 16 of them are decoded at once.
MAX_PIXELS = 64_000_000
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.IGNORECASE)
_WHITESPACE = re.compile(rb"\s+")


class ImageError(ValueError):
    """An image that cannot be decoded; the message names it."""


def decode_image(data: bytes, *, name: str = "image") -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB, Pillow's layout: the image processor reads it
    as it is, where a channels-first copy would cost more than it saves."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in ACCEPTED_FORMATS:
                    raise ImageError(f"{name}: {image.format} images are not accepted; send "
                                     f"{', '.join(ACCEPTED_FORMATS)}")
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise ImageError(f"{name}: {width}x{height} is larger than {MAX_PIXELS:,} pixels")
                # convert() copies even an RGB image
                return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: image is larger than {MAX_PIXELS:,} pixels") from None
    except (OSError, ValueError, SyntaxError) as error:  # Pillow's "cannot identify", truncated data
        raise ImageError(f"{name}: not a decodable {'/'.join(ACCEPTED_FORMATS)} image ({error})") from None


def decode_base64_image(text: str, *, name: str = "image") -> np.ndarray:
    """A base64 string, or a `data:image/...;base64,` URL, of an encoded image -> as `decode_image`."""
    if not isinstance(text, str):
        raise ImageError(f"{name}: expected a base64 string, got {type(text).__name__}")
    payload = text
    if text[:5].lower() == "data:":
        match = _DATA_URL.match(text)
        if match is None:
            raise ImageError(f"{name}: a data URL must read data:image/<format>;base64,<data>")
        mime = (match["mime"] or "").lower()
        if not mime.startswith("image/"):
            raise ImageError(f"{name}: data URL of type {mime or 'none'}, expected image/*")
        payload = text[match.end():]
    try:
        data = base64.b64decode(_WHITESPACE.sub(b"", payload.encode("ascii")), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as error:
        raise ImageError(f"{name}: not valid base64 ({error})") from None
    if not data:
        raise ImageError(f"{name}: empty image")
    return decode_image(data, name=name)
