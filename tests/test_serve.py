"""The JSON API and page server: predictions match Classifier, limits give 413, bad files 415, nothing on disk."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import numpy as np
import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from PIL import Image
from starlette.requests import Request

from braintumor.errors import UserError
from braintumor.synthetic.phantom import PHANTOM_CLASSES, make_phantom
from braintumor.inference.classifier import Classifier
from braintumor.serve import create_app, run_server
from braintumor.serve.app import PREVIEW_SIZE, read_uploads

REPO = Path(__file__).resolve().parents[1]
STATIC = REPO / "src" / "braintumor" / "serve" / "static"


def png_bytes(label="glioma", seed=0, size=64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_phantom(label, size, seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(label="meningioma", seed=1, size=64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_phantom(label, size, seed)).convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def dicom_bytes(label="pituitary", seed=2, size=64) -> bytes:
    """A uint16 MONOCHROME2 MR slice with file meta, written in memory with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    pixels = make_phantom(label, size, seed).astype(np.uint16) * 16 + 100  # a 12-bit-like range
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def decode_png(text: str) -> Image.Image:
    data = base64.b64decode(text)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def upload(*items):
    return [("files", (name, data, "application/octet-stream")) for name, data in items]


@pytest.fixture(scope="module")
def classifier(tiny_checkpoint):
    return Classifier.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def client(classifier):
    with TestClient(create_app(classifier, max_file_bytes=200_000, max_files=4)) as test_client:
        yield test_client


@pytest.mark.slow
def test_health_model_docs_and_page(client, classifier):
    assert client.get("/api/health").json() == {"status": "ok"}
    model = client.get("/api/model").json()
    assert model["classes"] == list(PHANTOM_CLASSES)
    assert model["arch"] == "resnet18" and model["fingerprint"] == classifier.fingerprint
    assert "Research use only" in model["note"]
    assert model["limits"] == {"max_file_bytes": 200_000, "max_files": 4}

    schema = client.get("/openapi.json")
    assert schema.status_code == 200
    body = schema.json()["paths"]["/api/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["properties"]["files"]["items"]["format"] == "binary"
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/static/docs.js" in docs.text
    assert client.get("/static/docs.js").status_code == 200

    page = client.get("/")
    assert page.status_code == 200 and 'data-testid="file-input"' in page.text
    assert "Research use only" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200


def test_static_files_load_nothing_from_other_hosts():
    import re

    external = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import|"""
                          r"""fetch\(\s*["'`](?:https?:)?//""", re.IGNORECASE)
    for path in STATIC.iterdir():
        assert not external.search(path.read_text()), f"{path.name} loads something from another host"


@pytest.mark.parametrize("name,make", [("slice.png", png_bytes), ("slice.jpg", jpeg_bytes),
                                       ("slice.dcm", dicom_bytes)])
def test_predict_matches_classifier(client, classifier, name, make):
    data = make()
    response = client.post("/api/predict?preview=1", files=upload((name, data)))
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["model"]["fingerprint"] == classifier.fingerprint
    [result] = payload["results"]
    expected = classifier.predict(data)
    assert result["filename"] == name
    assert result["label"] == expected.label
    assert list(result["probabilities"]) == list(PHANTOM_CLASSES)
    np.testing.assert_allclose([result["probabilities"][c] for c in PHANTOM_CLASSES],
                               [expected.probabilities[c] for c in PHANTOM_CLASSES], atol=1e-5)
    assert result["confidence"] == pytest.approx(max(result["probabilities"].values()))
    assert (result["width"], result["height"]) == (64, 64)
    preview = decode_png(result["preview_png_base64"])
    assert preview.size == (64, 64)
    assert "gradcam_png_base64" not in result


def test_preview_is_small_and_keeps_aspect(client):
    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.arange(600, dtype=np.uint8)[None, :] % 255, (300, 1))).save(buffer, format="PNG")
    result = client.post("/api/predict?preview=1", files=upload(("wide.png", buffer.getvalue()))).json()["results"][0]
    assert decode_png(result["preview_png_base64"]).size == (PREVIEW_SIZE, PREVIEW_SIZE // 2)


def test_multiple_files_in_one_request(client, classifier):
    items = [(f"{label}.png", png_bytes(label, seed=i)) for i, label in enumerate(PHANTOM_CLASSES[:3])]
    items.append(("slice.dcm", dicom_bytes()))
    results = client.post("/api/predict", files=upload(*items)).json()["results"]
    assert [r["filename"] for r in results] == [name for name, _ in items]
    for result, (_, data) in zip(results, items):
        expected = classifier.predict(data)
        assert result["label"] == expected.label
        assert result["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)
        assert "preview_png_base64" not in result


def test_explain_returns_decodable_overlay(client):
    response = client.post("/api/predict?explain=1", files=upload(("a.png", png_bytes()), ("b.dcm", dicom_bytes())))
    assert response.status_code == 200, response.text
    for result in response.json()["results"]:
        assert result["gradcam_target"] == result["label"]
        overlay = decode_png(result["gradcam_png_base64"])
        assert overlay.mode == "RGB" and min(overlay.size) >= 16

    chosen = client.post("/api/predict?explain=1&target=notumor", files=upload(("a.png", png_bytes())))
    assert chosen.json()["results"][0]["gradcam_target"] == "notumor"
    unknown = client.post("/api/predict?explain=1&target=edema", files=upload(("a.png", png_bytes())))
    assert unknown.status_code == 422 and "edema" in unknown.json()["detail"]


def test_file_too_large_and_too_many_files(client):
    big = np.random.default_rng(0).integers(0, 255, 300_000, dtype=np.uint8).tobytes()
    response = client.post("/api/predict", files=upload(("ok.png", png_bytes()), ("huge.png", big)))
    assert response.status_code == 413
    assert "huge.png" in response.json()["detail"] and "per file" in response.json()["detail"]

    response = client.post("/api/predict", files=upload(*[(f"{i}.png", png_bytes(seed=i)) for i in range(5)]))
    assert response.status_code == 413 and "at most 4" in response.json()["detail"]


@pytest.mark.parametrize("name,data,reason", [
    ("notes.txt", b"this is not an image\n", "unsupported file type"),  # the CLI's rule
    ("notes.png", b"this is not an image\n", "not an image"),
    ("cut.jpg", jpeg_bytes()[:len(jpeg_bytes()) * 2 // 3], "truncated image"),
    ("empty.png", b"", "empty"),
])
def test_unreadable_file_is_415_naming_it(client, name, data, reason):
    response = client.post("/api/predict", files=upload(("good.png", png_bytes()), (name, data)))
    assert response.status_code == 415
    detail = response.json()["detail"]
    assert detail.startswith(f"{name}:") and reason in detail


def test_bad_requests_are_refused_with_a_message(client):
    missing = client.post("/api/predict", files={"other": ("a.png", png_bytes(), "image/png")})
    assert missing.status_code == 422 and "files" in missing.json()["detail"]
    no_files = client.post("/api/predict", content=b'--XYZ\r\nContent-Disposition: form-data; name="note"\r\n\r\n'
                           b"x\r\n--XYZ--\r\n", headers={"content-type": "multipart/form-data; boundary=XYZ"})
    assert no_files.status_code == 422 and "no files" in no_files.json()["detail"]
    text = client.post("/api/predict", data={"files": "hello"}, files={"x": ("", b"")})
    assert text.status_code == 422 and "text" in text.json()["detail"]
    json_body = client.post("/api/predict", json={"files": []})
    assert json_body.status_code == 415 and "multipart/form-data" in json_body.json()["detail"]
    truncated = client.post("/api/predict", content=b"--XYZ\r\nContent-Disposition: form-data; name=\"files\"; "
                            b"filename=\"a.png\"\r\n\r\nabc",
                            headers={"content-type": "multipart/form-data; boundary=XYZ"})
    assert truncated.status_code == 400 and "incomplete" in truncated.json()["detail"]


def streamed_request(chunks: list[bytes], content_length: int | None = None):
    """A Starlette Request whose body arrives in ``chunks``; returns it and the list of chunks handed out."""
    pending, handed_out = list(chunks), []

    async def receive():
        if pending:
            handed_out.append(pending.pop(0))
            return {"type": "http.request", "body": handed_out[-1], "more_body": bool(pending)}
        return {"type": "http.request", "body": b"", "more_body": False}

    headers = [(b"content-type", b"multipart/form-data; boundary=B0UNDARY")]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = {"type": "http", "method": "POST", "path": "/api/predict", "headers": headers, "query_string": b""}
    return Request(scope, receive), handed_out


def multipart_chunks(file_bytes: int, chunk: int = 1000) -> list[bytes]:
    head = b'--B0UNDARY\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'
    body = head + b"x" * file_bytes + b"\r\n--B0UNDARY--\r\n"
    return [body[i:i + chunk] for i in range(0, len(body), chunk)]


def test_file_limit_is_enforced_while_streaming():
    chunks = multipart_chunks(50_000)
    request, handed_out = streamed_request(chunks)
    with pytest.raises(HTTPException) as caught:
        anyio.run(read_uploads, request, 2_500, 4)
    assert caught.value.status_code == 413
    # Refused on the chunk that crossed the limit, not after reading all ~50 chunks.
    assert len(handed_out) <= 4 < len(chunks)

    request, _ = streamed_request(multipart_chunks(2_500))
    [accepted] = anyio.run(read_uploads, request, 2_500, 4)
    assert accepted.filename == "big.png" and accepted.data == b"x" * 2_500


def test_declared_and_streamed_request_size_limits():
    request, handed_out = streamed_request(multipart_chunks(10), content_length=10**9)
    with pytest.raises(HTTPException) as caught:
        anyio.run(read_uploads, request, 1_000, 1)
    assert caught.value.status_code == 413 and "request body" in caught.value.detail
    assert handed_out == []  # refused on the Content-Length header alone

    # No Content-Length (chunked): many small form fields still cannot pass the request total.
    field = b'--B0UNDARY\r\nContent-Disposition: form-data; name="note"\r\n\r\n' + b"y" * 8_000 + b"\r\n"
    request, handed_out = streamed_request([field] * 40 + [b"--B0UNDARY--\r\n"])
    with pytest.raises(HTTPException) as caught:
        anyio.run(read_uploads, request, 1_000, 1)
    assert caught.value.status_code == 413 and len(handed_out) < 41


@pytest.mark.slow
def test_concurrent_requests_match_sequential_answers(tiny_checkpoint):
    classifier = Classifier.from_checkpoint(tiny_checkpoint)  # its own copy: the test hooks the model
    # Widen the window between the hooked block's output and Grad-CAM's backward pass, in which a plain
    # forward pass through the shared model would overwrite the activations captum saved.
    classifier.model.avgpool.register_forward_pre_hook(lambda module, inputs: time.sleep(0.02))
    items = [(f"{label}_{seed}.png", png_bytes(label, seed=seed))
             for seed in range(3) for label in PHANTOM_CLASSES]
    explain_flags = [i % 3 == 0 for i in range(len(items))]
    with TestClient(create_app(classifier, inference_threads=4)) as client:
        def ask(index: int) -> dict:
            suffix = "?explain=1" if explain_flags[index] else ""
            response = client.post(f"/api/predict{suffix}", files=upload(items[index]))
            assert response.status_code == 200, response.text
            return response.json()["results"][0]

        sequential = [ask(i) for i in range(len(items))]
        with ThreadPoolExecutor(8) as pool:
            concurrent = list(pool.map(ask, range(len(items))))
    for seq, con in zip(sequential, concurrent):
        assert con["filename"] == seq["filename"] and con["label"] == seq["label"]
        assert con["probabilities"] == pytest.approx(seq["probabilities"], abs=1e-6)
        if "gradcam_png_base64" in seq:
            a = np.asarray(decode_png(seq["gradcam_png_base64"]), dtype=float)
            b = np.asarray(decode_png(con["gradcam_png_base64"]), dtype=float)
            assert np.abs(a - b).max() <= 2  # same heat map (PNG of the same overlay, up to float noise)


class _WriteRecorder:
    """Records files opened for writing (an audit hook cannot be removed, so it is switched on and off)."""

    active = False
    writes: list[str] = []

    @classmethod
    def hook(cls, event: str, args) -> None:
        if not cls.active or event not in ("open", "os.mkdir", "os.rename", "os.remove"):
            return
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if not writing or path is None or str(path).startswith(("/dev/", "/proc/")):
                return
            cls.writes.append(str(path))
        else:
            cls.writes.append(f"{event} {args[0]}")


_hook_installed = False


def test_nothing_is_written_to_disk(classifier, tmp_path, monkeypatch):
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_WriteRecorder.hook)
        _hook_installed = True
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    # 1.2 MB uploads: Starlette's own form parser would spool these to temporary files (over 1 MB).
    big_png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1100, 1100), dtype=np.uint8)).save(big_png, "PNG")
    assert len(big_png.getvalue()) > 2**20
    with TestClient(create_app(classifier, max_file_bytes=4 * 2**20)) as client:
        client.get("/api/health")  # warm up lazily opened resources before recording
        _WriteRecorder.writes.clear()
        _WriteRecorder.active = True
        try:
            responses = [
                client.post("/api/predict?preview=1&explain=1",
                            files=upload(("big.png", big_png.getvalue()), ("s.dcm", dicom_bytes()))),
                client.post("/api/predict", files=upload(("bad.txt", b"nope" * 300_000))),
                client.post("/api/predict", files=upload(("huge.png", b"z" * (5 * 2**20)))),
            ]
        finally:
            _WriteRecorder.active = False
    assert [r.status_code for r in responses] == [200, 415, 413]
    assert _WriteRecorder.writes == []
    assert list(private_tmp.iterdir()) == []


def test_limits_and_port_errors_are_user_errors(classifier, tiny_checkpoint):
    with pytest.raises(UserError, match="positive"):
        create_app(classifier, max_files=0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}"):
            run_server(tiny_checkpoint, port=port)


@pytest.mark.slow
def test_load_benchmark_runs_in_small_mode(tiny_checkpoint):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--checkpoint", str(tiny_checkpoint),
         "--requests", "20", "--concurrency", "4", "--timeout", "120"],
        capture_output=True, text=True, timeout=180, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "errors: 0" in result.stdout and "p95" in result.stdout and "cores" in result.stdout


@pytest.mark.slow
def test_api_flags_out_of_distribution_and_low_confidence(trusted_checkpoint):
    from sklearn.datasets import load_sample_image

    classifier = Classifier.from_checkpoint(trusted_checkpoint)
    photo, slice_png = io.BytesIO(), io.BytesIO()
    Image.fromarray(load_sample_image("flower.jpg")).save(photo, format="JPEG")
    Image.fromarray(make_phantom("glioma", 64, 5)).save(slice_png, format="PNG")
    with TestClient(create_app(classifier)) as test_client:
        assert test_client.get("/favicon.ico").status_code == 200
        model = test_client.get("/api/model").json()
        assert model["ood_detector"] is True and model["temperature"] > 0
        files = [("files", ("flower.jpg", photo.getvalue(), "image/jpeg")),
                 ("files", ("slice.png", slice_png.getvalue(), "image/png"))]
        flower, phantom = test_client.post("/api/predict", files=files).json()["results"]
        assert flower["out_of_distribution"] is True and flower["ood_score"] > 1
        assert flower["status"] == "out_of_distribution" and len(flower["probabilities"]) == 4
        assert phantom["out_of_distribution"] is False and phantom["status"] == "ok"
        classifier.min_confidence = 0.99  # what serve --min-confidence 0.99 sets
        phantom = test_client.post("/api/predict", files=files[1:]).json()["results"][0]
        assert phantom["abstained"] is True and phantom["status"] == "low_confidence"


@pytest.mark.slow
def test_volumes_upload_as_a_verdict_with_the_most_suspicious_slice(client, classifier, tmp_path):
    from braintumor.synthetic.volumes import make_phantom_volume, write_multiframe_dicom, write_nifti
    from braintumor.inference.volume_verdict import classify_volume
    from braintumor.data.volumes import read_volume

    volume, _ = make_phantom_volume("glioma", 32, 6, seed=4)
    nifti = write_nifti(tmp_path / "case.nii.gz", volume)
    multiframe = write_multiframe_dicom(tmp_path / "case.dcm", volume)
    expected = classify_volume(classifier, read_volume(nifti))
    response = client.post("/api/predict?preview=1&explain=1",
                           files=upload(("case.nii.gz", nifti.read_bytes()), ("frames.dcm", multiframe.read_bytes()),
                                        ("a.png", png_bytes())))
    assert response.status_code == 200, response.text
    first, second, plain = response.json()["results"]
    for result in (first, second):
        assert result["label"] == expected.verdict and result["volume"]["rule"] == expected.rule
        assert result["volume"]["slices_total"] == 6 and len(result["volume"]["slices"]) == 6
        key = result["volume"]["key_slice"]
        assert result["probabilities"] == pytest.approx(dict(zip(classifier.classes,
                                                                 expected.probabilities[key])), abs=1e-5)
        assert decode_png(result["preview_png_base64"]).size == (32, 32)
        assert decode_png(result["volume_montage_png_base64"]).width > 300
        assert "gradcam_png_base64" in result
    assert "volume" not in plain and plain["label"] == classifier.predict(png_bytes()).label
    broken = client.post("/api/predict", files=upload(("bad.nii.gz", b"\x1f\x8b" + b"garbage" * 10)))
    assert broken.status_code == 415 and "cannot read volume bad.nii.gz" in broken.json()["detail"]
