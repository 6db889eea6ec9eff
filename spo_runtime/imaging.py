"""Images in and out: base64 (or data: URL) of a PNG/JPEG/WebP into an RGB PIL image, bounded from its header
before it is decoded, and a generated image into PNG (with its `parameters` text chunk), JPEG or WebP bytes.

An image comes in in two steps: `open_image` reads the header only (PIL's `Image.open` gives the size without
decoding) and refuses what is not a PNG/JPEG/WebP or is too large for the preset, then `load_rgb` decodes it,
once, turned upright by its EXIF orientation. `decode_image` does both; the callers run it off the event loop."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from spo_runtime.limits import MAX_IMAGE_PIXELS, SIZE_RANGE

FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}  # what encode_image writes
_WHAT = "base64 of a PNG, JPEG or WebP image"
_ORIENTATION = 0x0112  # EXIF: 5..8 turn the image a quarter, so its shown size swaps width and height
_MULTIPLE = 8  # sides are rounded down to this (the VAE's downscale) when the output takes the image's size


def decode_image(v: Any, size_range: tuple[int, int] | None = None, width: int | None = None,
                 height: int | None = None) -> Image.Image:
    """A PIL image, or base64 (optionally a data: URL) of a PNG/JPEG/WebP -> an upright RGB PIL image, decoded
    once. Refuses (ValueError) what does not decode, other formats, and, from the header before decoding,
    sizes `check_image_size` refuses. A caller's decoded RGB PIL image comes back as it is (not copied)."""
    return load_rgb(open_image(v, size_range, width, height))


def open_image(v: Any, size_range: tuple[int, int] | None = None, width: int | None = None,
               height: int | None = None, what: str = _WHAT) -> Image.Image:
    """base64 (a data: URL too), bytes or a PIL image -> a PIL image whose header is read and checked
    (`check_image_size`) but whose pixels are not decoded yet (`load_rgb` decodes them)."""
    if isinstance(v, Image.Image):
        img = v
    else:
        if isinstance(v, str):
            text = v.split(",", 1)[1] if v.startswith("data:") and "," in v else v
            try:
                raw = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"must be {what} (not valid base64)") from None
        elif isinstance(v, (bytes, bytearray, memoryview)):
            raw = bytes(v)
        else:
            raise ValueError(f"must be a base64 string (PNG, JPEG or WebP), got {type(v).__name__}")
        try:
            img = Image.open(io.BytesIO(raw), formats=("PNG", "JPEG", "WEBP"))  # the header only
        except Image.DecompressionBombError:
            raise ValueError(f"must have at most {MAX_IMAGE_PIXELS:,} pixels, got more than Pillow opens") from None
        except Exception:
            raise ValueError(f"must be {what} (not decodable as one)") from None
    check_image_size(shown_size(img), size_range, width, height)
    return img


def shown_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the image as shown, upright by its EXIF orientation, read without decoding (an
    orientation stored after a PNG's pixel data is only seen once decoded; `load_rgb` applies it then)."""
    w, h = img.size
    raw = img.info.get("exif")
    if raw:
        try:
            exif = Image.Exif()
            exif.load(raw)
            if exif.get(_ORIENTATION) in (5, 6, 7, 8):
                return h, w
        except Exception:  # an unreadable EXIF block: shown as stored, as exif_transpose does
            pass
    return w, h


def check_image_size(size: tuple[int, int], size_range: tuple[int, int] | None = None, width: int | None = None,
                     height: int | None = None) -> None:
    """Refuse (ValueError) an image of `size` for a preset whose sides are in `size_range` (None: the widest,
    limits.SIZE_RANGE): more than MAX_IMAGE_PIXELS pixels; a side the output takes (`width`/`height` None)
    outside the range once rounded down to a multiple of 8; resized (`width` or `height` given), more
    pixels than the preset's largest image. So nothing larger than what the preset makes is ever decoded."""
    w, h = size
    lo, hi = size_range or SIZE_RANGE
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(f"must have at most {MAX_IMAGE_PIXELS:,} pixels, got {w}x{h}")
    kept = [name for name, side, given in (("width", w, width), ("height", h, height))
            if given is None and not lo <= side - side % _MULTIPLE <= hi]
    if kept:
        raise ValueError(f"is {w}x{h}: the output takes the image's {' and '.join(kept)}, and the preset allows "
                         f"sides in {lo}..{hi} (send width and height to resize it)")
    if (width is not None or height is not None) and w * h > hi * hi:
        raise ValueError(f"is {w}x{h} ({w * h:,} pixels): an image resized to width x height may hold at most "
                         f"{hi}x{hi} = {hi * hi:,} pixels, the preset's largest (sides in {lo}..{hi})")


def load_rgb(img: Image.Image, what: str = _WHAT) -> Image.Image:
    """Decode an image `open_image` checked (a decoded one is not decoded again), turn it upright by its EXIF
    orientation and make it RGB. A decoded, upright RGB image comes back as it is (not copied); a caller's
    image is never changed in place: what needs turning or converting is a new image."""
    try:
        img.load()  # decoded here, so damaged data is this field's error
        if img.getexif().get(_ORIENTATION, 1) in range(2, 9):
            img = ImageOps.exif_transpose(img)  # upright, the orientation tag dropped: turned once
        return img if img.mode == "RGB" else img.convert("RGB")
    except Exception:
        raise ValueError(f"must be {what} (the image data is damaged)") from None


def image_from_bytes(raw: bytes, what: str = "a PNG, JPEG or WebP image", size_range: tuple[int, int] | None = None,
                     width: int | None = None, height: int | None = None) -> Image.Image:
    """The bytes of a PNG/JPEG/WebP file (an upload) -> an upright RGB PIL image, refused as decode_image
    refuses; `what` is what the error says the value must be."""
    return load_rgb(open_image(raw, size_range, width, height, what), what)


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
