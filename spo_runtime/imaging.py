"""Images in and out: base64 (or data: URL) of a PNG/JPEG/WebP into an RGB PIL image, bounded before it is
decoded, and a generated image into PNG (with its `parameters` text chunk), JPEG or WebP bytes."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from spo_runtime.limits import MAX_IMAGE_PIXELS

FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}  # what encode_image writes


def decode_image(v: Any) -> Image.Image:
    """A PIL image, or base64 (optionally a data: URL) of a PNG/JPEG/WebP -> an RGB PIL image. Refuses what
    does not decode, other formats, and more than MAX_IMAGE_PIXELS pixels (checked before decoding)."""
    if isinstance(v, Image.Image):
        return _rgb(v, "base64 of a PNG, JPEG or WebP image")
    if isinstance(v, str):
        text = v.split(",", 1)[1] if v.startswith("data:") and "," in v else v
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("must be base64 of a PNG, JPEG or WebP image (not valid base64)") from None
        return image_from_bytes(raw, "base64 of a PNG, JPEG or WebP image")
    raise ValueError(f"must be a base64 string (PNG, JPEG or WebP), got {type(v).__name__}")


def image_from_bytes(raw: bytes, what: str = "a PNG, JPEG or WebP image") -> Image.Image:
    """The bytes of a PNG/JPEG/WebP file (an upload) -> an RGB PIL image, refused as decode_image refuses;
    `what` is what the error says the value must be."""
    try:
        img = Image.open(io.BytesIO(raw), formats=("PNG", "JPEG", "WEBP"))
    except Exception:
        raise ValueError(f"must be {what} (not decodable as one)") from None
    return _rgb(img, what)


def _rgb(img: Image.Image, what: str) -> Image.Image:
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(f"must have at most {MAX_IMAGE_PIXELS:,} pixels, got {w}x{h}")
    try:
        if img.mode != "RGB":
            return img.convert("RGB")
        img.load()  # decoded here, so damaged data is this field's error; not copied: fresh, or the caller's own
        return img
    except Exception:
        raise ValueError(f"must be {what} (the image data is damaged)") from None


def encode_png(image: Image.Image, parameters: str | None = None) -> bytes:
    """PNG bytes of `image`, with `parameters` (A1111's name for the generation settings) as a text chunk."""
    info = None
    if parameters is not None:
        info = PngInfo()
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def encode_image(result, fmt: str = "png", quality: int = 95) -> bytes:
    """Our own encoding of a GeneratedImage; a PNG carries its parameters in a `parameters` text chunk."""
    if fmt == "png":
        return encode_png(result.image, result.parameters_text())
    buf = io.BytesIO()
    if fmt == "jpeg":
        result.image.save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        result.image.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(f"format: must be one of png, jpeg, webp, got {fmt!r}")
    return buf.getvalue()
