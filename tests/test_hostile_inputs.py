"""Hostile but fair inputs: bounded decoding, the server's decode budget, one reading rule, audit corner cases."""

from __future__ import annotations

import io
import sqlite3
import threading
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from braintumor.data import dedup
from braintumor.data import dicom, pixels
from bombs import dicom_deflate_bomb
from braintumor.data.io import ImageReadError, read_image
from braintumor.serve.budget import DecodeBudget


def png16(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_high_bit_depth_decodes_in_bounded_memory():
    side = 2000
    data = png16(np.tile(np.arange(side, dtype=np.uint16) * 30, (side, 1)))
    tracemalloc.start()
    image = read_image(data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    native = side * side * 2
    # float64 over the whole image alone would be 4x native (and the old path held several such copies); the
    # chunked path holds one copy, the 8-bit result and chunk-sized temporaries.
    assert peak < 2 * native + 16 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert image.size == (side, side) and np.asarray(image)[0, -1, 0] == 255 and np.asarray(image)[0, 0, 0] == 0


def test_chunked_conversion_equals_the_whole_image_conversion(monkeypatch):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 4096, (90, 70)).astype(np.uint16)
    whole = np.asarray(read_image(png16(values)))
    monkeypatch.setattr(pixels, "_ROW_CHUNK_PIXELS", 100)  # about one row at a time
    assert np.array_equal(np.asarray(read_image(png16(values))), whole)


def test_large_images_are_shrunk_right_after_decoding(monkeypatch):
    monkeypatch.setattr(pixels, "MAX_DECODED_SIDE", 64)
    values = np.zeros((200, 130), dtype=np.uint16)
    values[:, 65:] = 1000
    image = read_image(png16(values))
    assert image.size == (-(-130 // 4), 50)  # factor ceil(200 / 64) = 4
    row = np.asarray(image)[10, :, 0]
    assert row[0] == 0 and row[-1] == 255
    jpeg = io.BytesIO()
    Image.new("RGB", (300, 200), (200, 10, 10)).save(jpeg, format="JPEG")
    assert max(read_image(jpeg.getvalue()).size) <= 150  # DCT-scaled while decoding, then box-shrunk


def test_decoded_bytes_over_the_budget_are_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(pixels, "MAX_DECODED_BYTES", 50_000)
    with pytest.raises(ImageReadError, match=r"too large: 200x200 pixels of mode I;16 decode to"):
        read_image(png16(np.zeros((200, 200))))
    read_image(png16(np.zeros((100, 100))))  # 20,000 bytes: fine


def test_deflated_dicom_is_measured_before_pydicom_inflates_it(monkeypatch, tmp_path):
    data = dicom_deflate_bomb(side=512)
    assert len(data) < 20_000  # 512 KiB of pixels
    assert read_image(data).size == (512, 512)
    monkeypatch.setattr(pixels, "MAX_DECODED_BYTES", 10_000)
    monkeypatch.setattr(dicom, "check_byte_budget", lambda *args: None)  # only the inflate check may refuse
    called = []
    import pydicom

    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: called.append(1))
    # limit = 2 * budget + 1 MiB: this slice inflates to 512 KiB + headers, under it; a bigger one is over.
    bomb = dicom_deflate_bomb(side=1100)
    (tmp_path / "bomb.dcm").write_bytes(bomb)
    for source in (bomb, tmp_path / "bomb.dcm"):  # an upload and a file
        with pytest.raises(ImageReadError, match="inflate to more than"):
            read_image(source)
    assert not called


def test_the_server_and_the_cli_read_the_same_files(tmp_path):
    from pydicom.dataset import Dataset

    dataset = Dataset()  # a DICOM data set without preamble or meta header, as some exports write it
    dataset.Rows = dataset.Columns = 16
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    dataset.PixelData = (np.arange(256, dtype=np.uint16) * 8).tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, implicit_vr=True, little_endian=True)
    raw = buffer.getvalue()
    assert raw[128:132] != b"DICM"
    (tmp_path / "slice.dcm").write_bytes(raw)
    assert np.array_equal(np.asarray(read_image(raw, name="slice.dcm")), np.asarray(read_image(tmp_path / "slice.dcm")))

    gif = io.BytesIO()
    Image.new("P", (8, 8)).save(gif, format="GIF")
    for name in ("a.gif", "a.png"):
        (tmp_path / name).write_bytes(gif.getvalue())
        with pytest.raises(ImageReadError) as from_path:
            read_image(tmp_path / name)
        with pytest.raises(ImageReadError) as from_upload:
            read_image(gif.getvalue(), name=name)
        assert from_path.value.reason == from_upload.value.reason


def test_decode_budget_queues_instead_of_multiplying():
    budget = DecodeBudget(capacity=100)
    in_flight, peak, lock = [0], [0], threading.Lock()

    def work(weight):
        with budget.hold(weight):
            with lock:
                in_flight[0] += min(weight, 100)
                peak[0] = max(peak[0], in_flight[0])
            time.sleep(0.02)
            with lock:
                in_flight[0] -= min(weight, 100)

    threads = [threading.Thread(target=work, args=(w,)) for w in (60, 60, 60, 500, 30, 30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert peak[0] <= 100 and budget.peak <= 100 and budget.in_use == 0


def test_audit_lists_loops_and_other_file_types_and_accepts_one_class(tmp_path):
    from braintumor.data.audit import audit

    folder = tmp_path / "only"
    folder.mkdir()
    Image.new("L", (32, 32), 50).save(folder / "a.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "vol.nii.gz").write_bytes(b"\x1f\x8b")
    report = audit(tmp_path, cache_dir=tmp_path / "cache")
    reasons = {entry["path"].rsplit("/", 1)[-1]: entry["reason"] for entry in report["unreadable"]}
    assert "cannot access file" in reasons["loop.png"] and "'.nii.gz'" in reasons["vol.nii.gz"]
    assert report["class_counts"] == {"only": 2} and report["n_images"] == 2


def test_a_locked_hash_cache_falls_back_to_no_cache(tmp_path, monkeypatch):
    Image.new("L", (32, 32), 50).save(tmp_path / "a.png")
    monkeypatch.setattr(dedup, "CACHE_LOCK_WAIT_SECONDS", 0.1)
    dedup.hash_files([tmp_path / "a.png"], cache_dir=tmp_path / "cache")  # creates the cache
    (tmp_path / "a.png").touch()  # changed: needs hashing again, so a write to the cache
    other = sqlite3.connect(next((tmp_path / "cache").glob("*.sqlite")))
    other.execute("BEGIN EXCLUSIVE")  # another audit holds the cache
    try:
        with pytest.warns(UserWarning, match="without a cache"):
            records, _ = dedup.hash_files([tmp_path / "a.png"], cache_dir=tmp_path / "cache")
    finally:
        other.rollback()
        other.close()
    assert "exact" in records[0]
