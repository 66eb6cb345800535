"""data/io.py: every format and mode to RGB, DICOM windowing, and the bad-input matrix with exact messages."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.pixels import apply_rescale, apply_windowing
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from braintumor.data.pixels import minmax_to_uint8
from braintumor.errors import UserError
from braintumor.data.io import IMAGE_EXTENSIONS, ImageReadError, check_image, find_bad_images, read_image

H, W = 16, 24  # non-square, so a transposed result would be caught


def _rgb_array(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    assert image.size == (W, H)
    return np.asarray(image).astype(np.int32)


def _gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(gray, dtype=np.int32)[..., None], 3, axis=2)


def _color_blocks() -> np.ndarray:
    """Four solid 8x12 blocks (red, green, blue, white) - robust to JPEG ringing at the block centres."""
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:8, :12] = (255, 0, 0)
    rgb[:8, 12:] = (0, 255, 0)
    rgb[8:, :12] = (0, 0, 255)
    rgb[8:, 12:] = (255, 255, 255)
    return rgb


def _gradient(high: int = 255) -> np.ndarray:
    return np.linspace(0, high, H * W).reshape(H, W)


# --- 8-bit formats and modes ---------------------------------------------------------------------------------


LOSSLESS = ["png", "bmp", "tif"]


@pytest.mark.parametrize("ext", LOSSLESS)
def test_rgb_lossless_exact(tmp_path, ext):
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    path = tmp_path / f"rgb.{ext}"
    Image.fromarray(rgb).save(path)
    np.testing.assert_array_equal(_rgb_array(read_image(path)), rgb)


@pytest.mark.parametrize("ext", LOSSLESS + ["jpg"])
def test_grayscale_replicated_to_three_channels(tmp_path, ext):
    gray = np.rint(_gradient()).astype(np.uint8)
    path = tmp_path / f"gray.{ext}"
    Image.fromarray(gray, mode="L").save(path)
    out = _rgb_array(read_image(path))
    tolerance = 4 if ext == "jpg" else 0
    assert np.abs(out - _gray3(gray)).max() <= tolerance
    # 8-bit grayscale keeps its values: no min–max stretch (this gradient is already 0..255, so check a sub-range).
    path2 = tmp_path / f"narrow.{ext}"
    narrow = np.full((H, W), 100, np.uint8)
    narrow[:, W // 2 :] = 150
    Image.fromarray(narrow, mode="L").save(path2)
    assert np.abs(_rgb_array(read_image(path2)) - _gray3(narrow)).max() <= tolerance


def test_rgb_jpeg_colors(tmp_path):
    path = tmp_path / "rgb.jpg"
    Image.fromarray(_color_blocks()).save(path, quality=95)
    out = _rgb_array(read_image(path))
    for (row, col), color in {(4, 6): (255, 0, 0), (4, 18): (0, 255, 0), (12, 6): (0, 0, 255), (12, 18): (255,) * 3}.items():
        assert np.abs(out[row, col] - np.array(color)).max() <= 12


@pytest.mark.parametrize("ext", ["jpg", "tif"])
def test_cmyk_to_rgb(tmp_path, ext):
    # Pure inks: cyan, magenta, yellow, black; PIL writes Adobe-inverted CMYK JPEGs and reads them back.
    cmyk = np.zeros((H, W, 4), np.uint8)
    cmyk[:8, :12, 0] = 255
    cmyk[:8, 12:, 1] = 255
    cmyk[8:, :12, 2] = 255
    cmyk[8:, 12:, 3] = 255
    path = tmp_path / f"cmyk.{ext}"
    Image.fromarray(cmyk, mode="CMYK").save(path, **({"quality": 95} if ext == "jpg" else {}))
    assert Image.open(path).mode == "CMYK"
    out = _rgb_array(read_image(path))
    expected = {(4, 6): (0, 255, 255), (4, 18): (255, 0, 255), (12, 6): (255, 255, 0), (12, 18): (0, 0, 0)}
    tolerance = 12 if ext == "jpg" else 0
    for (row, col), color in expected.items():
        assert np.abs(out[row, col] - np.array(color)).max() <= tolerance, (row, col, out[row, col])


@pytest.mark.parametrize("ext", LOSSLESS)
def test_palette(tmp_path, ext):
    palette = np.array([[0, 0, 0], [255, 0, 0], [10, 200, 30], [40, 50, 60]], np.uint8)
    indices = (np.arange(H * W).reshape(H, W) % 4).astype(np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.flatten().tolist())
    path = tmp_path / f"palette.{ext}"
    image.save(path)
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(_rgb_array(read_image(path)), palette[indices])


def test_palette_transparency_composited_on_black(tmp_path):
    palette = np.array([[200, 100, 50], [255, 255, 255]], np.uint8)
    indices = np.zeros((H, W), np.uint8)
    indices[:, W // 2 :] = 1
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.flatten().tolist())
    path = tmp_path / "transparent.png"
    image.save(path, transparency=1)  # index 1 fully transparent
    expected = palette[indices].astype(np.int32)
    expected[:, W // 2 :] = 0
    np.testing.assert_array_equal(_rgb_array(read_image(path)), expected)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_rgba_composited_on_black(tmp_path, ext):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (H, W), dtype=np.uint8)
    alpha[0, :3] = (0, 255, 128)
    path = tmp_path / f"rgba.{ext}"
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(path)
    expected = rgb.astype(np.float64) * alpha[..., None] / 255.0
    out = _rgb_array(read_image(path))
    assert np.abs(out - expected).max() <= 1.0
    assert (out[0, 0] == 0).all()  # fully transparent -> black
    np.testing.assert_array_equal(out[0, 1], rgb[0, 1])  # opaque -> unchanged


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_la_composited_on_black(tmp_path, ext):
    gray = np.full((H, W), 200, np.uint8)
    alpha = np.zeros((H, W), np.uint8)
    alpha[:, 8:16] = 128
    alpha[:, 16:] = 255
    path = tmp_path / f"la.{ext}"
    Image.fromarray(np.dstack([gray, alpha]), mode="LA").save(path)
    out = _rgb_array(read_image(path))
    assert (out[:, :8] == 0).all()
    assert np.abs(out[:, 8:16] - 100).max() <= 1
    assert (out[:, 16:] == 200).all()


@pytest.mark.parametrize("ext", LOSSLESS)
def test_bilevel(tmp_path, ext):
    bits = (np.arange(H * W).reshape(H, W) % 3 == 0).astype(np.uint8) * 255
    path = tmp_path / f"bilevel.{ext}"
    Image.fromarray(bits, mode="L").convert("1").save(path)
    assert Image.open(path).mode == "1"
    np.testing.assert_array_equal(_rgb_array(read_image(path)), _gray3(bits))


# --- high bit depth grayscale: min–max to 8 bit -----------------------------------------------------------------


def _expected_minmax(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return _gray3(np.rint((values - values.min()) / (values.max() - values.min()) * 255))


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16bit_gradient_scaled_min_max(tmp_path, ext):
    # 1000..3000 in 16 bit: clipping or >>8 would give 3..11; min–max must give the full 0..255.
    values = np.rint(_gradient(2000) + 1000).astype(np.uint16)
    path = tmp_path / f"gray16.{ext}"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    out = _rgb_array(read_image(path))
    assert out.min() == 0 and out.max() == 255
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    np.testing.assert_array_equal(out, _expected_minmax(values))


def test_16bit_constant_gives_zeros(tmp_path):
    path = tmp_path / "constant16.png"
    Image.fromarray(np.full((H, W), 4321, np.uint16)).save(path)
    assert (_rgb_array(read_image(path)) == 0).all()


@pytest.mark.parametrize(
    ("mode", "values"),
    [
        ("I", (np.arange(H * W).reshape(H, W) * 1000 - 70000).astype(np.int32)),
        ("F", (np.sin(np.arange(H * W)).reshape(H, W) * 3.5 - 1.0).astype(np.float32)),
    ],
)
def test_int32_and_float_tiff_scaled_min_max(tmp_path, mode, values):
    path = tmp_path / f"{mode}.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == mode
    np.testing.assert_array_equal(_rgb_array(read_image(path)), _expected_minmax(values))


def test_float_nan_and_constant(tmp_path):
    values = np.full((H, W), 2.5, np.float32)
    values[0, 0] = np.nan
    values[0, 1] = 7.5
    out = _rgb_array(read_image(Image.fromarray(values)))
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 255 and out[1, 1, 0] == 0
    assert (_rgb_array(read_image(Image.fromarray(np.full((H, W), 3.0, np.float32)))) == 0).all()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw_rows: bytes | None) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(raw_rows if raw_rows is not None else b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def test_16bit_rgb_png(tmp_path):
    # PIL cannot write 48-bit PNG, so it is assembled by hand: filter byte 0 per row, big-endian samples.
    rgb16 = np.random.default_rng(2).integers(0, 65536, (H, W, 3), dtype=np.uint16)
    rows = b"".join(b"\0" + rgb16[row].astype(">u2").tobytes() for row in range(H))
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png_bytes(W, H, 16, 2, rows))
    out = _rgb_array(read_image(path))
    assert np.abs(out - rgb16.astype(np.float64) / 257.0).max() <= 1.0


# --- sources other than paths ------------------------------------------------------------------------------------


def test_bytes_and_pil_sources(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (H, W, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    np.testing.assert_array_equal(_rgb_array(read_image(buffer.getvalue())), rgb)
    np.testing.assert_array_equal(_rgb_array(read_image(bytearray(buffer.getvalue()))), rgb)
    source = Image.fromarray(np.dstack([rgb, np.full((H, W), 255, np.uint8)]), mode="RGBA")
    out = read_image(source)
    np.testing.assert_array_equal(_rgb_array(out), rgb)
    assert out is not source


def test_extension_is_case_insensitive_and_content_decides_format(tmp_path):
    path = tmp_path / "SCAN.JPG"
    Image.fromarray(_color_blocks()).save(path, format="PNG")  # a PNG with a .JPG name still reads exactly
    np.testing.assert_array_equal(_rgb_array(read_image(path)), _color_blocks())
    assert IMAGE_EXTENSIONS == frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm"})


def test_multi_frame_tiff_gives_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((H, W), value, np.uint8)) for value in (10, 200)]
    path = tmp_path / "stack.tif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert (_rgb_array(read_image(path)) == 10).all()


# --- DICOM ------------------------------------------------------------------------------------------------------


def _write_dicom(path: Path, pixels: np.ndarray, *, preamble: bool = True, **attributes) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128 if preamble else None)
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "MR"
    color = pixels.ndim == 3
    dataset.Rows, dataset.Columns = pixels.shape[:2]
    dataset.SamplesPerPixel = 3 if color else 1
    dataset.PhotometricInterpretation = "RGB" if color else "MONOCHROME2"
    if color:
        dataset.PlanarConfiguration = 0
    bits = pixels.dtype.itemsize * 8
    dataset.BitsAllocated = bits
    dataset.BitsStored = bits
    dataset.HighBit = bits - 1
    dataset.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for key, value in attributes.items():
        setattr(dataset, key, value)
    dataset.PixelData = np.ascontiguousarray(pixels).tobytes()
    dataset.save_as(path, enforce_file_format=preamble)
    return path


def _stored_ramp() -> np.ndarray:
    return np.rint(_gradient(3000)).astype(np.uint16)


def test_dicom_rescale_and_window_hand_computed(tmp_path):
    stored = _stored_ramp()
    stored[0, :4] = (1000, 1040, 1140, 1240)  # inside the window once rescaled (HU below)
    path = _write_dicom(
        tmp_path / "ct.dcm", stored, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400
    )
    out = _rgb_array(read_image(path))
    # HU = stored - 1024: -24, 16, 116, 216. LINEAR window c=40, w=400: y = ((x - 39.5) / 399 + 0.5) * 255.
    hu = np.array([-24.0, 16.0, 116.0, 216.0])
    expected = np.rint(((hu - 39.5) / 399 + 0.5) * 255)
    np.testing.assert_array_equal(out[0, :4, 0], expected)
    assert out[0, 4, 0] == 0 and out[-1, -1, 0] == 255  # below / above the window saturate
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_dicom_window_matches_pydicom_reference(tmp_path):
    stored = _stored_ramp()
    path = _write_dicom(
        tmp_path / "mr.dcm",
        stored,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=[2500, 100],  # multi-valued: the first preset applies
        WindowWidth=[3000, 50],
    )
    out = _rgb_array(read_image(path))[..., 0]
    dataset = pydicom.dcmread(path)
    windowed = apply_windowing(apply_rescale(dataset.pixel_array, dataset), dataset, index=0)
    # pydicom maps the window onto the rescaled stored range [0*2-100, 65535*2-100]; bring it to 0..255.
    y_min, y_max = -100.0, 65535 * 2 - 100.0
    reference = np.rint((windowed - y_min) / (y_max - y_min) * 255)
    assert np.abs(out - reference).max() <= 1
    assert out.min() == 0 and out.max() == 255


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_window_function_matches_pydicom(tmp_path, function):
    stored = _stored_ramp()
    path = _write_dicom(tmp_path / f"{function}.dcm", stored, WindowCenter=1200, WindowWidth=700,
                        VOILUTFunction=function)
    out = _rgb_array(read_image(path))[..., 0]
    dataset = pydicom.dcmread(path)
    reference = np.rint(apply_windowing(dataset.pixel_array, dataset) / 65535 * 255)  # output range 0..65535
    assert np.abs(out - reference).max() <= 1
    assert out.min() == 0 and out.max() == 255


def _voi_lut_item(first: int, lut: np.ndarray, bits: int = 16) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.LUTDescriptor = [len(lut), first, bits]
    item.add_new(0x00283006, "US", [int(v) for v in lut])  # LUT Data: US or OW; US keeps it a list
    return item


def test_dicom_voi_lut_sequence_windowed_as_pydicom_says(tmp_path):
    stored = _stored_ramp()
    # A non-linear (gamma-like) LUT over stored values 500..2547, 12-bit output inside a 16-bit entry; the
    # file's Window Center/Width disagree on purpose: the LUT sequence wins, as pydicom prefers it.
    lut = np.rint(4095 * np.linspace(0, 1, 2048) ** 0.5).astype(np.uint16)
    path = _write_dicom(tmp_path / "voilut.dcm", stored, RescaleSlope=1, RescaleIntercept=0,
                        VOILUTSequence=[_voi_lut_item(500, lut)], WindowCenter=100, WindowWidth=10)
    out = _rgb_array(read_image(path))[..., 0]
    dataset = pydicom.dcmread(path)
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = np.rint(apply_modality_lut(dataset.pixel_array, dataset)).astype(np.int64)
    reference = np.rint(apply_voi_lut(values, dataset).astype(np.float64) / 4095 * 255)  # the LUT's range
    np.testing.assert_array_equal(out, reference)
    assert out[0, 0] == 0 and out[-1, -1] == 255  # below / above the LUT's input range clamp to its ends
    # The hand-written window the module used to apply would give something else entirely.
    assert not np.array_equal(out, minmax_to_uint8(stored))


def test_compressed_dicom_without_decoder_names_the_plugin(tmp_path, monkeypatch):
    from pydicom.pixels.decoders.base import Decoder
    from pydicom.uid import JPEGLSLossless, RLELossless

    stored = _stored_ramp()
    path = _write_dicom(tmp_path / "plain.dcm", stored)
    dataset = pydicom.dcmread(path)
    dataset.compress(RLELossless, encoding_plugin="pydicom")  # encoders ship with pydicom for RLE only
    packed = tmp_path / "rle.dcm"
    dataset.save_as(packed)
    np.testing.assert_array_equal(_rgb_array(read_image(packed)), _rgb_array(read_image(path)))

    dataset.file_meta.TransferSyntaxUID = JPEGLSLossless  # claims JPEG-LS: its decoder is a plug-in
    fake = tmp_path / "jpegls.dcm"
    dataset.save_as(fake)
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    assert check_image(fake) == ("DICOM pixel data compressed as JPEG-LS Lossless Image Compression needs a "
                                 "decoder plug-in: pip install pylibjpeg pylibjpeg-libjpeg "
                                 "(or pip install 'braintumor[dicom-codecs]')")


def test_jpeg2000_dicom_decoded_with_the_optional_plugin(tmp_path):
    pytest.importorskip("openjpeg", reason="the dicom-codecs extra (pylibjpeg-openjpeg) is not installed")
    from pydicom.uid import JPEG2000Lossless

    stored = np.rint(np.linspace(0, 3000, 64 * 64)).astype(np.uint16).reshape(64, 64)  # openjpeg needs >= 64 px
    path = _write_dicom(tmp_path / "plain.dcm", stored, BitsStored=12, HighBit=11)
    dataset = pydicom.dcmread(path)
    dataset.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    packed = tmp_path / "j2k.dcm"
    dataset.save_as(packed)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == JPEG2000Lossless
    np.testing.assert_array_equal(np.asarray(read_image(packed)), np.asarray(read_image(path)))


def test_dicom_without_window_is_min_max(tmp_path):
    stored = np.rint(_gradient(1000) + 500).astype(np.uint16)
    path = _write_dicom(tmp_path / "nowindow.dcm", stored, RescaleSlope=3, RescaleIntercept=7)
    np.testing.assert_array_equal(_rgb_array(read_image(path)), _expected_minmax(stored))


def test_dicom_monochrome1_inverted(tmp_path):
    stored = np.rint(_gradient(1000)).astype(np.uint16)
    path = _write_dicom(tmp_path / "mono1.dcm", stored, PhotometricInterpretation="MONOCHROME1")
    out = _rgb_array(read_image(path))
    np.testing.assert_array_equal(out, 255 - _expected_minmax(stored))
    assert out[0, 0, 0] == 255 and out[-1, -1, 0] == 0


def test_dicom_signed_pixels(tmp_path):
    stored = (np.rint(_gradient(2000)) - 1000).astype(np.int16)
    path = _write_dicom(tmp_path / "signed.dcm", stored)
    np.testing.assert_array_equal(_rgb_array(read_image(path)), _expected_minmax(stored))


def test_dicom_rgb_kept(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 256, (H, W, 3), dtype=np.uint8)
    path = _write_dicom(tmp_path / "color.dcm", rgb)
    np.testing.assert_array_equal(_rgb_array(read_image(path)), rgb)


def test_dicom_from_bytes_and_without_extension(tmp_path):
    stored = _stored_ramp()
    path = _write_dicom(tmp_path / "slice.dcm", stored, WindowCenter=1500, WindowWidth=1000)
    from_path = _rgb_array(read_image(path))
    np.testing.assert_array_equal(_rgb_array(read_image(path.read_bytes())), from_path)
    no_extension = tmp_path / "IM000001"
    no_extension.write_bytes(path.read_bytes())  # recognised by the DICM magic at byte 128
    np.testing.assert_array_equal(_rgb_array(read_image(no_extension)), from_path)
    assert check_image(no_extension) is None


def test_dicom_without_preamble_read_by_extension(tmp_path):
    stored = _stored_ramp()
    path = _write_dicom(tmp_path / "raw.dcm", stored, preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(_rgb_array(read_image(path)), _expected_minmax(stored))


def test_dicom_multi_frame_refused(tmp_path):
    volume = np.zeros((3, H, W), np.uint16)
    path = _write_dicom(tmp_path / "volume.dcm", volume, NumberOfFrames=3)
    with pytest.raises(ImageReadError) as raised:
        read_image(path)
    assert str(raised.value) == (
        f"cannot read image {path}: multi-frame DICOM (3 frames) is a volume: braintumor predict and explain "
        "read volumes, training and evaluation need 2-D slices"
    )


def test_dicom_bad_inputs(tmp_path, monkeypatch):
    not_dicom = tmp_path / "notes.dcm"
    not_dicom.write_text("this is a text file, not a scan\n")
    assert check_image(not_dicom) == "not a valid DICOM file"

    path = _write_dicom(tmp_path / "short.dcm", _stored_ramp())
    data = path.read_bytes()
    short = tmp_path / "cut.dcm"
    short.write_bytes(data[: len(data) - 100])
    assert check_image(short) == "truncated DICOM pixel data"

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", H * W - 1)
    assert check_image(path) == (
        f"too large: {W}x{H} pixels exceeds the decompression-bomb limit of {H * W - 1} pixels "
        "(PIL.Image.MAX_IMAGE_PIXELS)"
    )


# --- bad-input matrix -------------------------------------------------------------------------------------------


@pytest.fixture
def bad_files(tmp_path):
    """Good and bad files side by side, with the exact reason each bad one must get."""
    rgb = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    good_jpg = tmp_path / "good.jpg"
    Image.fromarray(rgb).save(good_jpg, quality=90)
    truncated_jpg = tmp_path / "truncated.jpg"
    truncated_jpg.write_bytes(good_jpg.read_bytes()[: good_jpg.stat().st_size // 2])
    good_png = tmp_path / "good.png"
    Image.fromarray(rgb).save(good_png)
    truncated_png = tmp_path / "truncated.png"
    truncated_png.write_bytes(good_png.read_bytes()[: good_png.stat().st_size // 2])
    text_jpg = tmp_path / "notes.jpg"
    text_jpg.write_text("not an image at all\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    huge = tmp_path / "huge.png"  # the header claims 30000x30000; the file itself is tiny
    huge.write_bytes(_png_bytes(30000, 30000, 8, 0, None))
    gif = tmp_path / "anim.gif"
    Image.fromarray(rgb).save(gif)
    limit = Image.MAX_IMAGE_PIXELS
    return {
        good_jpg: None,
        truncated_jpg: "truncated image",
        good_png: None,
        truncated_png: "truncated image",
        text_jpg: "not an image",
        empty: "empty file (0 bytes)",
        huge: f"too large: 900000000 pixels exceeds the decompression-bomb limit of {limit} pixels "
        "(PIL.Image.MAX_IMAGE_PIXELS)",
        gif: "unsupported file type '.gif'; supported: .bmp, .dcm, .jpeg, .jpg, .png, .tif, .tiff",
        tmp_path / "missing.png": "file not found",
        tmp_path: "is a directory, not an image file",
    }


def test_bad_input_matrix_exact_messages(bad_files):
    for path, reason in bad_files.items():
        assert check_image(path) == reason, path
        if reason is None:
            assert read_image(path).mode == "RGB"
            continue
        with pytest.raises(ImageReadError) as raised:
            read_image(path)
        message = str(raised.value)
        assert message == f"cannot read image {path}: {reason}"
        assert "\n" not in message
        assert isinstance(raised.value, UserError) and raised.value.exit_code == 2
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # detection never relaxes the global flag


def test_find_bad_images_lists_them_in_order(bad_files, capsys):
    paths = list(bad_files)
    expected = [(Path(path), reason) for path, reason in bad_files.items() if reason is not None]
    assert find_bad_images(paths) == expected
    assert find_bad_images([str(path) for path in paths], progress=True) == expected
    assert capsys.readouterr().err == ""  # stderr is not a terminal under pytest: no bar
    assert find_bad_images([]) == []


def test_find_bad_images_progress_bar_on_terminal(bad_files, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    find_bad_images(list(bad_files)[:3], progress=True)
    assert "checking images" in capsys.readouterr().err


@pytest.mark.parametrize("ratio", [1.5, 3.0])  # PIL warns between 1x and 2x its limit and raises above 2x
def test_decompression_bomb_limit_both_sides_of_2x(tmp_path, monkeypatch, ratio):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((H, W), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(H * W / ratio))
    reason = check_image(path)
    assert reason is not None and reason.startswith("too large: ")
    assert f"limit of {int(H * W / ratio)} pixels" in reason
    if ratio < 2:
        assert reason.startswith(f"too large: {W}x{H} pixels exceeds")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", H * W)  # exactly at the limit is allowed
    assert check_image(path) is None


def test_truncated_lazy_pil_image_and_empty_bytes(bad_files):
    truncated = next(path for path, reason in bad_files.items() if reason == "truncated image")
    with Image.open(truncated) as lazy:
        with pytest.raises(ImageReadError, match=r"^cannot read image <PIL image>: truncated image$"):
            read_image(lazy)
    with pytest.raises(ImageReadError, match=r"^cannot read image upload\.png: empty file \(0 bytes\)$"):
        read_image(b"", name="upload.png")
    with pytest.raises(ImageReadError, match=r"^cannot read image <image bytes>: not an image$"):
        read_image(b"hello")
    with pytest.raises(TypeError):
        read_image(42)
