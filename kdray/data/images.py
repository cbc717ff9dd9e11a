"""One image decoder for training and serving: a file or uploaded bytes into RGB, or a typed error.

Every failure is an :class:`ImageError` whose ``kind`` a caller can act on (``corrupt`` -> 400,
``too_large`` -> 413, ``unsupported`` -> 415 in the HTTP service) with a one-line reason that
never contains pixel data or DICOM patient fields. Dimensions come from the header and are
checked before any pixel is decoded, so a small file declaring 20000x20000 pixels costs nothing.

- PNG, JPEG, BMP, TIFF (Pillow; other formats are ``unsupported``): the first frame; 16-bit and
  float gray min-max scaled to 0-255; alpha dropped (colour channels kept as stored, not
  composited); palette, CMYK and gray become RGB.
- DICOM (``DICM`` at offset 128, ``application/dicom`` or a ``.dcm`` name; pydicom): the **first
  frame** of a multi-frame file (the loader before this module took the middle slice; training
  and serving now share one rule), modality LUT, the first VOI window/LUT when present,
  MONOCHROME1 inverted after windowing (bright = dense, as MONOCHROME2), palette colour through
  its LUT, YBR as RGB; gray and non-8-bit colour min-max scaled to 0-255.
- Pillow's own bomb limit (``Image.MAX_IMAGE_PIXELS``) still applies on top of ``max_pixels``.
  No global setting of Pillow, pydicom or ``warnings`` is changed: safe from several threads.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "FORMATS",
    "MAX_PIXELS",
    "ImageError",
    "check_image",
    "decode",
    "read_image",
    "to_model_input",
]

MAX_PIXELS = 64_000_000  # 8000 x 8000: far above any fundus photo or MRI slice
Admit = Callable[[int], None]  # decode's hook: the pixels about to be decoded (may raise)
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "DICOM")
_PIL_FORMATS = frozenset({"PNG", "JPEG", "MPO", "BMP", "TIFF"})  # MPO: JPEG with extra frames
_HIGH_BIT_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N"})
_SIGNATURES = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"II*\0": "TIFF", b"MM\0*": "TIFF"}
Kind = Literal["corrupt", "too_large", "unsupported"]


class ImageError(ValueError):
    """An image that cannot be used.

    Attributes:
        kind: ``corrupt`` (not an image, empty, truncated, broken), ``too_large`` (above the
            pixel limit) or ``unsupported`` (a format or DICOM transfer syntax not decoded here).
        reason: one line, safe to show to a client and to log; also the exception's message.
    """

    def __init__(self, kind: Kind, reason: str) -> None:
        super().__init__(reason)
        self.kind: Kind = kind
        self.reason = reason


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageError(
            "too_large",
            f"image is {width}×{height} pixels, above the {max_pixels / 1e6:g}-megapixel limit",
        )


def _to_uint8(array: np.ndarray, *, stretch_uint8: bool = False) -> np.ndarray:
    """Min-max any numeric image to uint8; 8-bit input is kept unless ``stretch_uint8``."""
    if array.dtype == np.uint8 and not stretch_uint8:
        return array
    array = np.asarray(array, dtype=np.float32)
    finite = np.isfinite(array)
    if not finite.all():  # NaN/inf (float TIFF, DICOM float data) would poison the range
        if not finite.any():
            return np.zeros(array.shape, dtype=np.uint8)
        lo, hi = float(array[finite].min()), float(array[finite].max())
        array = np.nan_to_num(array, nan=lo, posinf=hi, neginf=lo)
    lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        return np.zeros(array.shape, dtype=np.uint8)
    return ((array - lo) / (hi - lo) * 255.0).round().astype(np.uint8)


def _short(exc: BaseException, limit: int = 160) -> str:
    """The last line of an exception's message (pydicom lists one line per plugin), clipped."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scrub(text: str, ds: Any) -> str:
    """``text`` without the values of the dataset's patient fields (library messages may quote)."""
    try:
        for elem in ds:
            if elem.VR == "PN" or "Patient" in (elem.keyword or ""):
                value = str(elem.value or "")
                if len(value) >= 2:
                    text = text.replace(value, "<redacted>")
        return text
    except Exception:  # a dataset too broken to iterate: say nothing specific
        return "details withheld"


def _check_codestream(ds: Any, rows: int, cols: int) -> None:
    """The first frame's own JPEG / JPEG 2000 header must agree with Rows x Columns.

    pydicom's decoders decode a codestream at the size the codestream declares, so without this a
    small file whose DICOM header says 256x256 could make them allocate for 150 megapixels.
    """
    from pydicom.encaps import get_frame

    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        data = io.BytesIO(get_frame(ds.PixelData, 0, number_of_frames=frames))
        with Image.open(data, formats=("JPEG", "JPEG2000")) as image:  # the header only
            width, height = image.size
    except Exception:  # RLE, JPEG-LS, broken data, Pillow's own bomb error: the decoder judges
        return
    if (width, height) != (cols, rows):
        raise ImageError(
            "corrupt",
            f"DICOM header says {cols}×{rows} pixels but its compressed "
            f"frame declares {width}×{height}",
        )


def _decode_dicom(
    fp: IO[bytes], has_magic: bool, max_pixels: int, admit: Admit | None = None
) -> Image.Image:
    import pydicom  # imported here: only DICOM inputs pay for it
    from pydicom import pixels as px
    from pydicom import uid

    # The header first: defer_size leaves large values (the pixel data) unread until needed.
    try:
        ds = pydicom.dcmread(fp, force=True, defer_size=64 * 1024)
    except Exception as exc:  # pydicom raises many types on broken input
        raise ImageError("corrupt", f"not a readable DICOM file ({type(exc).__name__})") from None
    if not ds.keys() & {0x7FE00008, 0x7FE00009, 0x7FE00010}:  # (Float/DoubleFloat) PixelData
        if not has_magic and 0x00080016 not in ds:  # no DICM marker and no SOP Class UID
            raise ImageError("corrupt", "not a DICOM file (no DICM marker, no DICOM image data)")
        raise ImageError("corrupt", "DICOM file has no pixel data")
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    except Exception as exc:  # header values that do not parse (bad VR, bad encoding)
        raise ImageError("corrupt", f"unreadable DICOM header ({type(exc).__name__})") from None
    if rows < 1 or cols < 1:
        raise ImageError("corrupt", "DICOM file declares no valid image size (Rows/Columns)")
    _check_pixels(cols, rows, max_pixels)
    if admit is not None:
        admit(cols * rows)
    if not syntax:  # a bare dataset (no file meta): the encoding pydicom found tells the syntax
        implicit, little = ds.original_encoding
        syntax = uid.ImplicitVRLittleEndian if implicit else uid.ExplicitVRLittleEndian
        syntax = syntax if little else uid.ExplicitVRBigEndian
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
    unsupported = f"DICOM transfer syntax {syntax.name} ({syntax}) cannot be decoded here"
    try:
        if not px.get_decoder(syntax).is_available:
            raise ImageError("unsupported", f"{unsupported}: no decoder plugin is installed")
    except NotImplementedError:  # pydicom has no decoder for this syntax at all
        raise ImageError("unsupported", unsupported) from None
    if syntax.is_encapsulated:
        _check_codestream(ds, rows, cols)

    try:
        pixels = px.pixel_array(ds, index=0)  # the first frame only; YBR comes back as RGB
        if photometric == "PALETTE COLOR":
            pixels = px.apply_color_lut(pixels, ds)
        elif pixels.ndim == 2:
            pixels = px.apply_modality_lut(pixels, ds)
            if "WindowCenter" in ds or "VOILUTSequence" in ds:
                pixels = px.apply_voi_lut(pixels, ds, index=0)
    except Exception as exc:  # broken or unsupported pixel data, in many exception types
        reason = _scrub(_short(exc), ds)
        if "does not support" in reason or "not supported" in reason:
            raise ImageError("unsupported", f"{unsupported} ({reason})") from None
        raise ImageError("corrupt", f"cannot decode the DICOM pixel data: {reason}") from None
    if pixels.ndim == 3 and pixels.shape[-1] == 4:  # palette with an alpha LUT
        pixels = pixels[..., :3]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3)):
        raise ImageError("corrupt", f"DICOM pixel data of shape {pixels.shape} is not an image")
    if pixels.ndim == 2:
        pixels = _to_uint8(pixels, stretch_uint8=True)  # e.g. 1-bit or 12-bit stored in 8/16
        if photometric == "MONOCHROME1":  # 0 is white: invert so bright = dense
            pixels = 255 - pixels
    else:
        pixels = _to_uint8(pixels)
    return Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")


_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)  # a warning: if -W error


def _bomb(exc: Exception, max_pixels: int) -> ImageError:
    """Pillow's own guard (its larger limit) fired first: too large all the same."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return ImageError(
        "too_large", f"image has {size}, above the {max_pixels / 1e6:g}-megapixel limit"
    )


def _decode_pil(
    fp: IO[bytes], head: bytes, max_pixels: int, admit: Admit | None = None
) -> Image.Image:
    try:
        image = Image.open(fp)  # reads the header only
    except _BOMB as exc:
        raise _bomb(exc, max_pixels) from None
    except UnidentifiedImageError:  # Pillow also says this when a known format's header is broken
        fmt = next((f for sig, f in _SIGNATURES.items() if head.startswith(sig)), None)
        reason = f"broken {fmt} header" if fmt else "not an image (no known image format)"
        raise ImageError("corrupt", reason) from None
    except Exception as exc:  # a known format with a broken header (bad CRC, bad fields)
        raise ImageError("corrupt", f"unreadable image header: {_short(exc)}") from None
    if image.format not in _PIL_FORMATS:
        raise ImageError(
            "unsupported",
            f"{image.format} images are not accepted; expected one of {', '.join(FORMATS)}",
        )
    _check_pixels(image.width, image.height, max_pixels)
    if admit is not None:
        admit(image.width * image.height)
    fmt = "JPEG" if image.format == "MPO" else image.format
    try:
        image.load()  # the full decode of the first frame: truncated or corrupt data shows here
    except _BOMB as exc:
        raise _bomb(exc, max_pixels) from None
    except Exception as exc:
        raise ImageError("corrupt", f"truncated or corrupt {fmt}: {_short(exc)}") from None
    try:
        if image.mode in _HIGH_BIT_MODES:
            return Image.fromarray(_to_uint8(np.asarray(image))).convert("RGB")
        if image.mode == "RGB":
            return image  # convert() would copy it: 48 MB more for a 4096 x 4096 photo
        return image.convert("RGB")  # drops alpha; palette, CMYK, gray and 1-bit become RGB
    except Exception:
        raise ImageError(
            "unsupported", f"{fmt} images in mode {image.mode} are not supported"
        ) from None


def decode(
    source: str | Path | bytes,
    *,
    filename: str | None = None,
    content_type: str | None = None,
    max_pixels: int = MAX_PIXELS,
    admit: Admit | None = None,
) -> Image.Image:
    """An image file or its bytes as an RGB Pillow image at its own size.

    Multi-frame files give their first frame (for DICOM too: the loader before this module took
    a volume's middle slice; training and serving now share the first-frame rule).

    Args:
        source: a path, or the file's bytes (e.g. an upload).
        filename: the upload's name (a ``.dcm`` suffix marks DICOM); a path's own name otherwise.
        content_type: ``application/dicom`` marks DICOM; other types are only hints (the bytes
            decide).
        max_pixels: width x height limit, checked from the header before the pixels are decoded.
        admit: called with width x height once the header passed, before the pixels are
            decoded; it may raise to refuse (the server's budget of pixels in flight).

    Raises:
        ImageError: see the module docstring for what each kind means.
    """
    with ExitStack() as stack:
        if isinstance(source, str | Path):
            path = Path(source)
            filename = filename or path.name
            try:  # a file object, not read_bytes: Pillow and pydicom read only what they need
                fp: IO[bytes] = stack.enter_context(path.open("rb"))
            except OSError as exc:
                raise ImageError(
                    "corrupt", f"cannot read the file ({exc.strerror or exc})"
                ) from None
        else:
            fp = io.BytesIO(source)
        head = fp.read(132)
        fp.seek(0)
        if not head:
            raise ImageError("corrupt", "empty file")
        has_magic = head[128:132] == b"DICM"
        named = (filename or "").lower().endswith(".dcm")
        typed = (content_type or "").split(";")[0].strip().lower() == "application/dicom"
        if has_magic or named or typed:
            return _decode_dicom(fp, has_magic, max_pixels, admit)
        return _decode_pil(fp, head, max_pixels, admit)


def read_image(source: str | Path | bytes, size: int, **decode_kwargs: Any) -> np.ndarray:
    """Any supported image as RGB uint8 (3, size, size): the model input, in training and serving.

    Grayscale becomes three equal channels, so MRI and fundus share the model input; resizing is
    bilinear (Pillow). ``decode_kwargs`` go to :func:`decode`.

    Raises:
        ImageError: the image cannot be used.
    """
    return to_model_input(decode(source, **decode_kwargs), size)


def to_model_input(image: Image.Image, size: int) -> np.ndarray:
    """An RGB image as the model input: bilinear to (size, size), uint8 (3, size, size)."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


def check_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> str | None:
    """None if the file decodes, else why not (one line): the dataset check, one full decode."""
    try:
        decode(path, max_pixels=max_pixels)
    except ImageError as exc:
        return exc.reason
    return None
