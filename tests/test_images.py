"""kdray.data.images: every supported input decodes to RGB, every bad one to a typed ImageError."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile, features
from pydicom.data import get_testdata_file

from kdray.data.images import MAX_PIXELS, ImageError, check_image, decode, read_image

RNG = np.random.default_rng(0)


def _dicom(name: str) -> str:
    return get_testdata_file(name, download=False)  # bundled in the wheel; never the network


def _png(image: Image.Image, fmt: str = "PNG", **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def _square(dtype=np.uint8, high: int = 255, size: int = 40) -> np.ndarray:
    """A bright square on a dark background."""
    array = np.full((size, size), high // 10, dtype=dtype)
    array[10:30, 10:30] = high
    return array


def _error(source, **kwargs) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode(source, **kwargs)
    return info.value


_PEAK_PROBE = """
import json, sys
from kdray.data.images import ImageError, decode

def kib(field):  # this process's memory, from /proc/self/status (kB)
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1])

source = sys.argv[1] or sys.stdin.buffer.read()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak RSS (VmHWM) starts again from the current RSS
before = kib("VmRSS")
try:
    decode(source).load()  # the pixels too: decode may return a lazily read image
    kind = reason = None
except ImageError as err:
    kind, reason = err.kind, err.reason
grew = (kib("VmHWM") - before) * 1024
print(json.dumps({"grew": grew, "kind": kind, "reason": reason}))
"""


def _decode_peak(source: bytes | Path) -> tuple[float, ImageError | None]:
    """Decode ``source`` in a fresh Python process: how much its peak RSS grew during the call
    (bytes) and the error, if any. ``ru_maxrss`` of pytest's own process is a high-water mark of
    the whole session: once an earlier test peaked higher, it hides any growth here."""
    path, data = (str(source), None) if isinstance(source, Path) else ("", source)
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE, path],
        input=data,
        capture_output=True,
        timeout=60,
        check=True,
    )
    out = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    error = ImageError(out["kind"], out["reason"]) if out["kind"] else None
    return out["grew"], error


def test_the_peak_memory_probe_sees_a_decode_that_allocates():
    """The probe below can fail: a real 6000x5000 RGB decode (90 MB of pixels) shows."""
    grew, error = _decode_peak(_png(Image.new("RGB", (6000, 5000))))
    assert error is None and grew > 80e6, grew


def _old_read_image(path: Path, size: int) -> np.ndarray:
    """The loader kdray.data.folders had before kdray.data.images (non-DICOM part), verbatim."""

    def to_uint8(array):
        if array.dtype == np.uint8:
            return array
        array = array.astype(np.float32)
        lo, hi = float(array.min()), float(array.max())
        if hi <= lo:
            return np.zeros(array.shape, dtype=np.uint8)
        return ((array - lo) / (hi - lo) * 255.0).round().astype(np.uint8)

    image = Image.open(path)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = Image.fromarray(to_uint8(np.asarray(image)))
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


# --- Pillow formats ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(RNG.integers(0, 256, (37, 53), dtype=np.uint8)),
        Image.fromarray(RNG.integers(0, 65535, (40, 30), dtype=np.uint16)),
        Image.fromarray(RNG.integers(0, 256, (33, 17, 3), dtype=np.uint8)),
        Image.fromarray(RNG.integers(0, 256, (20, 20, 4), dtype=np.uint8)),
        Image.fromarray(RNG.integers(0, 256, (33, 17, 3), dtype=np.uint8)).convert("P"),
        Image.fromarray(RNG.integers(0, 2, (20, 21)).astype(bool)),
    ],
    ids=["L", "I;16", "RGB", "RGBA", "P", "1"],
)
def test_png_output_is_unchanged_from_the_old_loader(tmp_path, image):
    path = tmp_path / "x.png"
    image.save(path)
    for size in (24, image.width):
        assert np.array_equal(read_image(path, size), _old_read_image(path, size))


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("gray8.png", lambda: Image.fromarray(_square())),
        ("gray16.png", lambda: Image.fromarray(_square(np.uint16, 4000))),
        ("rgb.png", lambda: Image.fromarray(_square()).convert("RGB")),
        ("rgba.png", lambda: Image.fromarray(_square()).convert("RGBA")),
        ("la.png", lambda: Image.fromarray(_square()).convert("LA")),
        ("palette.png", lambda: Image.fromarray(_square()).convert("RGB").convert("P")),
        ("photo.jpg", lambda: Image.fromarray(_square()).convert("RGB")),
        ("cmyk.jpg", lambda: Image.fromarray(_square()).convert("CMYK")),
        ("scan.bmp", lambda: Image.fromarray(_square()).convert("RGB")),
        ("gray8.tif", lambda: Image.fromarray(_square())),
        ("gray16.tif", lambda: Image.fromarray(_square(np.uint16, 4000))),
        ("float.tif", lambda: Image.fromarray(_square(np.float32, 1000))),
    ],
)
def test_supported_images_become_rgb_of_the_model_size(tmp_path, name, make):
    make().save(tmp_path / name)
    array = read_image(tmp_path / name, 20)
    assert array.shape == (3, 20, 20) and array.dtype == np.uint8
    assert array[:, 10, 10].min() > 200  # the square stays bright
    assert array[:, 0, 0].max() < 60
    assert decode(tmp_path / name).size == (40, 40)  # decode keeps the native size


def test_16_bit_values_use_the_full_range(tmp_path):
    values = np.linspace(1000, 4000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    array = np.asarray(decode(tmp_path / "d.png"))
    assert array.min() == 0 and array.max() == 255
    assert np.array_equal(array[..., 0], array[..., 2])


def test_alpha_is_dropped_not_composited(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert np.asarray(decode(tmp_path / "a.png"))[0, 0].tolist() == [200, 0, 0]


def test_multi_frame_tiff_gives_its_first_frame(tmp_path):
    first, second = Image.new("L", (16, 16), 30), Image.new("L", (16, 16), 220)
    first.save(tmp_path / "m.tif", save_all=True, append_images=[second])
    assert np.asarray(decode(tmp_path / "m.tif")).max() == 30


# --- bad inputs -------------------------------------------------------------------------------


def test_empty_text_and_random_bytes_are_corrupt(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("patient notes, not an image\n" * 20)
    assert _error(tmp_path / "empty.png").kind == "corrupt"
    assert "empty file" in _error(tmp_path / "empty.png").reason
    for source in (tmp_path / "notes.png", RNG.integers(0, 256, 4000, dtype=np.uint8).tobytes()):
        err = _error(source)
        assert err.kind == "corrupt" and "not an image" in err.reason
    assert _error(tmp_path / "missing.png").kind == "corrupt"
    assert _error(b"just text", filename="scan.dcm").kind == "corrupt"  # named .dcm, not DICOM


def test_truncated_and_broken_files_are_corrupt():
    png = _png(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    jpg = _png(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    err = _error(png[: len(png) // 2])
    assert err.kind == "corrupt" and "truncated or corrupt PNG" in err.reason
    err = _error(jpg[: len(jpg) // 2])
    assert err.kind == "corrupt" and "truncated or corrupt JPEG" in err.reason
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF  # the IHDR checksum
    err = _error(bytes(bad_crc))
    assert err.kind == "corrupt" and "PNG" in err.reason
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # nobody turned Pillow's check off


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "ICO"])
def test_other_formats_are_unsupported(fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    err = _error(_png(Image.new("RGB", (16, 16)), fmt))
    assert err.kind == "unsupported"
    assert fmt in err.reason and "PNG, JPEG, BMP, TIFF, DICOM" in err.reason


def _declared(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (IHDR patched, checksum fixed)."""
    data = bytearray(_png(Image.new("L", (8, 8))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (10000, 10000), (9000, 8000)])
def test_decompression_bomb_is_too_large_before_decoding(width, height):
    limit = Image.MAX_IMAGE_PIXELS
    start = time.perf_counter()
    err = _error(_declared(width, height))
    assert time.perf_counter() - start < 0.5
    grew, probed = _decode_peak(_declared(width, height))
    assert grew < 50e6 and probed is not None and probed.kind == "too_large", (grew, probed)
    assert err.kind == "too_large" and "above the 64-megapixel limit" in err.reason
    if width * height < 2 * limit:  # Pillow's own error (above 2x its limit) gives only a count
        assert f"{width}×{height} pixels" in err.reason
    assert limit == Image.MAX_IMAGE_PIXELS  # Pillow's global guard is left alone


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_pillow_bomb_warning_raised_as_error_is_still_too_large():
    err = _error(_declared(10000, 10000))  # between Pillow's warning and error limits
    assert err.kind == "too_large" and "100,000,000 pixels" in err.reason


def test_pillow_guard_switched_off_does_not_bypass_ours(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    err = _error(_declared(20000, 20000))
    assert err.kind == "too_large" and "20000×20000 pixels" in err.reason


def test_max_pixels_is_a_parameter():
    png = _png(Image.new("L", (100, 100)))
    err = _error(png, max_pixels=5000)
    assert err.kind == "too_large" and "100×100" in err.reason
    assert decode(png, max_pixels=10_000).size == (100, 100)
    assert MAX_PIXELS == 64_000_000


def test_check_image(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_bytes(b"")
    assert check_image(tmp_path / "ok.png") is None
    assert check_image(tmp_path / "bad.jpg") == "empty file"
    assert "8×8" in check_image(tmp_path / "ok.png", max_pixels=10)


# --- DICOM ------------------------------------------------------------------------------------


def _minmax(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float64)
    return np.round((array - array.min()) / (array.max() - array.min()) * 255).astype(np.uint8)


def test_mr_slice_applies_its_voi_window():
    ds = pydicom.dcmread(_dicom("MR_small.dcm"))
    array = np.asarray(decode(_dicom("MR_small.dcm")))
    assert array.shape == (64, 64, 3)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = _minmax(np.clip(ds.pixel_array, center - width / 2, center + width / 2))
    assert np.abs(array[..., 0].astype(int) - expected).max() <= 2
    assert not np.array_equal(array[..., 0], _minmax(ds.pixel_array))  # the window clips


def test_ct_window_is_applied_in_hounsfield_units(tmp_path):
    ds = pydicom.dcmread(_dicom("CT_small.dcm"))
    assert float(ds.RescaleIntercept) == -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400  # soft tissue, in HU: needs the modality LUT first
    ds.save_as(tmp_path / "ct.dcm")
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = _minmax(np.clip(hu, -160, 240))
    array = np.asarray(decode(tmp_path / "ct.dcm"))[..., 0]
    assert np.abs(array.astype(int) - expected).max() <= 2


def test_multi_frame_dicom_gives_its_first_frame():
    frames = pydicom.dcmread(_dicom("rtdose.dcm")).pixel_array  # 15 frames, grayscale
    assert frames.shape[0] == 15 and not np.array_equal(frames[0], frames[1])
    assert np.array_equal(np.asarray(decode(_dicom("rtdose.dcm")))[..., 0], _minmax(frames[0]))
    colour = pydicom.dcmread(_dicom("SC_rgb_rle_2frame.dcm")).pixel_array  # 2 RGB frames
    assert np.array_equal(np.asarray(decode(_dicom("SC_rgb_rle_2frame.dcm"))), colour[0])
    assert read_image(_dicom("examples_ybr_color.dcm"), 32).shape == (3, 32, 32)  # 30 YBR JPEG


def test_palette_dicom_becomes_colour():
    array = np.asarray(decode(_dicom("examples_palette.dcm")))
    assert array.shape == (350, 800, 3)
    assert not np.array_equal(array[..., 0], array[..., 2])


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(_dicom("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    normal = np.asarray(decode(_dicom("MR_small.dcm")))[..., 0]
    inverted = np.asarray(decode(tmp_path / "m1.dcm"))[..., 0]
    assert np.array_equal(inverted, 255 - normal)
    assert np.corrcoef(normal.ravel(), inverted.ravel())[0, 1] < -0.99


def test_unsupported_transfer_syntax_is_named():
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSNearLossless

    if get_decoder(JPEGLSNearLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    err = _error(_dicom("JPEGLSNearLossless_08.dcm"))
    assert err.kind == "unsupported"
    assert "JPEG-LS" in err.reason and "1.2.840.10008.1.2.4.81" in err.reason


def test_dicom_without_pixel_data_is_corrupt(tmp_path):
    ds = pydicom.dcmread(_dicom("MR_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    err = _error(tmp_path / "nopix.dcm")
    assert err.kind == "corrupt" and "no pixel data" in err.reason


def test_dicom_declaring_huge_size_is_too_large_without_decoding(tmp_path):
    ds = pydicom.dcmread(_dicom("MR_small.dcm"))
    ds.Rows = ds.Columns = 60000
    ds.save_as(tmp_path / "huge.dcm")
    start = time.perf_counter()
    err = _error(tmp_path / "huge.dcm")
    assert time.perf_counter() - start < 0.5
    assert err.kind == "too_large" and "60000×60000 pixels" in err.reason


def test_dicom_bytes_are_found_by_content_type_or_name():
    ds = pydicom.dcmread(_dicom("MR_small.dcm"))
    ds.preamble = None  # no 128-byte preamble: no "DICM" marker to find
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    data = buf.getvalue()
    assert data[128:132] != b"DICM"
    assert _error(data).kind == "corrupt"  # nothing says DICOM: not an image
    expected = np.asarray(decode(_dicom("MR_small.dcm")))
    assert np.array_equal(np.asarray(decode(data, content_type="application/dicom")), expected)
    assert np.array_equal(np.asarray(decode(data, filename="SCAN.DCM")), expected)
    magic = Path(_dicom("MR_small.dcm")).read_bytes()  # the marker wins over a wrong name
    assert np.array_equal(np.asarray(decode(magic, filename="scan.png")), expected)


def test_dicom_errors_never_show_patient_fields(tmp_path):
    ds = pydicom.dcmread(_dicom("MR_small.dcm"))
    ds.PatientName, ds.PatientID = "Doe^Jane", "expected"  # "expected" is in pydicom's message
    ds.PixelData = ds.PixelData[:1000]  # truncated pixel data: pydicom's own message is shown
    ds.save_as(tmp_path / "short.dcm")
    err = _error(tmp_path / "short.dcm")
    assert err.kind == "corrupt" and "pixel data" in err.reason
    assert "Doe" in str(ds.PatientName) and "Doe" not in err.reason
    assert "expected" not in err.reason and "expected" not in str(err)


def test_dicom_codestream_larger_than_its_header_is_not_decoded(tmp_path):
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(_dicom("SC_rgb_jpeg_dcmtk.dcm"))  # 100x100, JPEG baseline
    assert (ds.Rows, ds.Columns) == (100, 100)
    ds.PixelData = encapsulate([_png(Image.new("RGB", (6000, 5000)), "JPEG")])
    ds.save_as(tmp_path / "lying.dcm")
    grew, err = _decode_peak(tmp_path / "lying.dcm")
    assert grew < 50e6, grew
    assert err is not None
    assert err.kind == "corrupt" and "100×100" in err.reason and "6000×5000" in err.reason
