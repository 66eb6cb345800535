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
from braintumor.visualize.explain import DEFAULT_MIRROR
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
    assert model["limits"]["max_file_bytes"] == 200_000 and model["limits"]["max_files"] == 4
    assert set(model["explain_methods"]) >= {"gradcam"} and model["default_explain_method"] in model["explain_methods"]
    assert model["explain_method_labels"]["gradcam"] == "Grad-CAM"
    assert model["default_explain_mirror"] is DEFAULT_MIRROR  # the page's checkbox starts from it

    schema = client.get("/openapi.json")
    assert schema.status_code == 200
    body = schema.json()["paths"]["/api/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["properties"]["files"]["items"]["format"] == "binary"
    # The response is typed with the results schema's own fields (built from its dataclasses).
    from dataclasses import fields

    from braintumor.inference.results import Prediction, VolumePrediction

    components = schema.json()["components"]["schemas"]
    answer = schema.json()["paths"]["/api/predict"]["post"]["responses"]["200"]["content"]["application/json"]
    assert answer["schema"]["$ref"].endswith("/PredictResponse")
    assert set(components["FileResult"]["properties"]) == {f.name for f in fields(Prediction)} | {
        "width", "height", "preview_png_base64", "explanation", "volume_prediction"}
    assert set(components["VolumeSummary"]["properties"]) == ({f.name for f in fields(VolumePrediction)}
                                                               - {"montage"}) | {"montage_png_base64"}
    assert "503" in schema.json()["paths"]["/api/predict"]["post"]["responses"]
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
    assert result["source"] == name
    assert result["predicted_class"] == expected.predicted_class
    assert list(result["probabilities"]) == list(PHANTOM_CLASSES)
    np.testing.assert_allclose([result["probabilities"][c] for c in PHANTOM_CLASSES],
                               [expected.probabilities[c] for c in PHANTOM_CLASSES], atol=1e-5)
    assert result["confidence"] == pytest.approx(max(result["probabilities"].values()))
    assert (result["width"], result["height"]) == (64, 64)
    preview = decode_png(result["preview_png_base64"])
    assert preview.size == (64, 64)
    assert result["explanation"] is None and result["volume_prediction"] is None
    assert result["status"] in ("ok", "atypical", "not_mri", "uncertain")
    assert set(result) >= {"source", "predicted_class", "confidence", "probabilities", "status", "not_mri_score",
                           "atypical_score", "volume", "slice_index"}


def test_preview_is_small_and_keeps_aspect(client):
    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.arange(600, dtype=np.uint8)[None, :] % 255, (300, 1))).save(buffer, format="PNG")
    result = client.post("/api/predict?preview=1", files=upload(("wide.png", buffer.getvalue()))).json()["results"][0]
    assert decode_png(result["preview_png_base64"]).size == (PREVIEW_SIZE, PREVIEW_SIZE // 2)


def test_multiple_files_in_one_request(client, classifier):
    items = [(f"{label}.png", png_bytes(label, seed=i)) for i, label in enumerate(PHANTOM_CLASSES[:3])]
    items.append(("slice.dcm", dicom_bytes()))
    results = client.post("/api/predict", files=upload(*items)).json()["results"]
    assert [r["source"] for r in results] == [name for name, _ in items]
    for result, (_, data) in zip(results, items):
        expected = classifier.predict(data)
        assert result["predicted_class"] == expected.predicted_class
        assert result["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)
        assert result["preview_png_base64"] is None


def test_explain_returns_decodable_overlay(client):
    response = client.post("/api/predict?explain=1", files=upload(("a.png", png_bytes()), ("b.dcm", dicom_bytes())))
    assert response.status_code == 200, response.text
    for result in response.json()["results"]:
        assert result["explanation"]["target"] == result["predicted_class"]
        overlay = decode_png(result["explanation"]["overlay_png_base64"])
        assert overlay.mode == "RGB" and min(overlay.size) >= 16

    chosen = client.post("/api/predict?explain=1&target=notumor", files=upload(("a.png", png_bytes())))
    assert chosen.json()["results"][0]["explanation"]["target"] == "notumor"
    unknown = client.post("/api/predict?explain=1&target=edema", files=upload(("a.png", png_bytes())))
    assert unknown.status_code == 422 and "edema" in unknown.json()["detail"]
    other = client.post("/api/predict?explain=1&method=gradcampp&layer=layer3", files=upload(("a.png", png_bytes())))
    assert other.status_code == 200, other.text
    assert other.json()["results"][0]["explanation"]["method"] == "gradcampp"
    assert other.json()["results"][0]["explanation"]["layer"] == "layer3"
    assert other.json()["results"][0]["explanation"]["mirror"] is True  # the default: averaged with the mirror
    single = client.post("/api/predict?explain=1&method=gradcampp&layer=layer3&mirror=false",
                         files=upload(("a.png", png_bytes())))
    assert single.status_code == 200 and single.json()["results"][0]["explanation"]["mirror"] is False
    for query, layer in (("method=gradcam", "layer4"), ("method=occlusion", None)):  # the method's own block, or none
        reply = client.post(f"/api/predict?explain=1&{query}", files=upload(("a.png", png_bytes())))
        assert reply.status_code == 200 and reply.json()["results"][0]["explanation"]["layer"] == layer
    assert (single.json()["results"][0]["explanation"]["heatmap_png_base64"]
            != other.json()["results"][0]["explanation"]["heatmap_png_base64"])
    bad_layer = client.post("/api/predict?explain=1&layer=nowhere", files=upload(("a.png", png_bytes())))
    assert bad_layer.status_code == 422 and "nowhere" in bad_layer.json()["detail"]
    bad_method = client.post("/api/predict?explain=1&method=astrology", files=upload(("a.png", png_bytes())))
    assert bad_method.status_code == 422 and "astrology" in bad_method.json()["detail"]


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
        assert con["source"] == seq["source"] and con["predicted_class"] == seq["predicted_class"]
        assert con["probabilities"] == pytest.approx(seq["probabilities"], abs=1e-6)
        if seq["explanation"] is not None:
            a = np.asarray(decode_png(seq["explanation"]["overlay_png_base64"]), dtype=float)
            b = np.asarray(decode_png(con["explanation"]["overlay_png_base64"]), dtype=float)
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
def test_load_benchmark_runs_in_small_mode():
    result = subprocess.run(  # its own random-init model (no --checkpoint), small
        [sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--arch", "resnet18", "--image-size", "32",
         "--requests", "20", "--concurrency", "4", "--timeout", "120"],
        capture_output=True, text=True, timeout=180, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "errors: 0" in result.stdout and "p95" in result.stdout and "cores" in result.stdout


def flagging_classifier(checkpoint) -> Classifier:
    """A tiny classifier whose trust scores are set by the picture: colour images score not_mri 5.0 (flagged),
    grayscale ones with a bright top-left corner atypical 3.0, everything else 0.2 on both tiers. The scores
    enter through the runtime seam the service reads (``infer`` -> logits, scores (B, 2)), so status, batching
    and calibration are the service's own."""
    import torch

    classifier = Classifier.from_checkpoint(checkpoint)
    real_infer = classifier.infer

    mean = torch.tensor(classifier.mean).view(1, 3, 1, 1)
    std = torch.tensor(classifier.std).view(1, 3, 1, 1)

    def infer(batch):
        logits, _ = real_infer(batch)
        pixels = batch * std + mean  # back to 0..1 RGB
        colour = (pixels[:, 0] - pixels[:, 1]).abs().mean(dim=(1, 2)) + (pixels[:, 1] - pixels[:, 2]).abs().mean(dim=(1, 2))
        corner = pixels[:, :, :4, :4].mean(dim=(1, 2, 3))
        not_mri = torch.where(colour > 0.02, 5.0, 0.2)
        atypical = torch.where(corner > 0.8, 3.0, 0.2)
        return logits, torch.stack([not_mri, atypical], dim=1).numpy()

    classifier.infer = infer
    classifier.trust_tiers = ("not_mri", "atypical")
    classifier.has_ood = True
    return classifier


def marked_phantom_png(label="glioma", seed=5, size=64) -> bytes:
    """A phantom slice with a bright top-left corner: atypical to :func:`flagging_classifier`."""
    pixels = make_phantom(label, size, seed).copy()
    pixels[:size // 8, :size // 8] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def photo_jpeg() -> bytes:
    from sklearn.datasets import load_sample_image

    photo = io.BytesIO()
    Image.fromarray(load_sample_image("flower.jpg")).save(photo, format="JPEG")
    return photo.getvalue()


def test_api_statuses_are_the_services(tiny_checkpoint):
    classifier = flagging_classifier(tiny_checkpoint)
    items = [("flower.jpg", photo_jpeg()), ("slice.png", png_bytes()), ("odd.png", marked_phantom_png())]
    with TestClient(create_app(classifier)) as test_client:
        flower, phantom, odd = test_client.post("/api/predict", files=upload(*items)).json()["results"]
        assert flower["status"] == "not_mri" and flower["not_mri_score"] > 1 and len(flower["probabilities"]) == 4
        assert phantom["status"] == "ok" and odd["status"] == "atypical" and odd["atypical_score"] > 1
        for result, (_, data) in zip((flower, phantom, odd), items):
            assert result["status"] == classifier.predict(data).status
        classifier.min_confidence = 0.99  # what serve --min-confidence 0.99 sets
        phantom = test_client.post("/api/predict", files=upload(items[1])).json()["results"][0]
        assert phantom["status"] == "uncertain"


@pytest.mark.slow
def test_api_uses_a_fitted_models_trust_scores(trusted_checkpoint):
    classifier = Classifier.from_checkpoint(trusted_checkpoint)
    with TestClient(create_app(classifier)) as test_client:
        assert test_client.get("/favicon.ico").status_code == 200
        assert test_client.get("/api/model").json()["ood_detector"] is True
        [flower] = test_client.post("/api/predict", files=upload(("flower.jpg", photo_jpeg()))).json()["results"]
    expected = classifier.predict(photo_jpeg())
    assert flower["status"] == expected.status != "ok"
    for name in ("not_mri_score", "atypical_score"):
        assert flower[name] == (None if getattr(expected, name) is None else pytest.approx(getattr(expected, name)))


@pytest.mark.slow
def test_volumes_upload_as_a_verdict_with_the_most_suspicious_slice(client, classifier, tmp_path):
    from braintumor.synthetic.volumes import make_phantom_volume, write_multiframe_dicom, write_nifti
    from braintumor.data.volumes import read_volume
    from braintumor.inference.service import predict_volume

    volume, _ = make_phantom_volume("glioma", 32, 6, seed=4)
    nifti = write_nifti(tmp_path / "case.nii.gz", volume)
    multiframe = write_multiframe_dicom(tmp_path / "case.dcm", volume)
    expected = predict_volume(classifier, read_volume(nifti))
    response = client.post("/api/predict?preview=1&explain=1",
                           files=upload(("case.nii.gz", nifti.read_bytes()), ("frames.dcm", multiframe.read_bytes()),
                                        ("a.png", png_bytes())))
    assert response.status_code == 200, response.text
    first, second, plain = response.json()["results"]
    for result in (first, second):
        volume = result["volume_prediction"]
        assert volume["verdict"] == expected.verdict and volume["rule"] == expected.rule
        assert volume["status"] == expected.status
        assert volume["slices_total"] == 6 and len(volume["slices"]) == 6
        assert [row["slice_index"] for row in volume["slices"]] == list(range(6))
        key = volume["key_slice"]
        # The card's own fields are the key slice's prediction, and say so (slice_index), not the volume's.
        assert result["slice_index"] == key and result["volume"] is not None
        assert result["probabilities"] == pytest.approx(dict(zip(classifier.classes,
                                                                 expected.probabilities[key])), abs=1e-5)
        assert result["status"] == volume["slices"][key]["status"]
        assert decode_png(result["preview_png_base64"]).size == (32, 32)
        assert decode_png(volume["montage_png_base64"]).width > 300
        assert "overlay_png_base64" in result["explanation"]
    assert plain["volume_prediction"] is None
    assert plain["predicted_class"] == classifier.predict(png_bytes()).predicted_class
    broken = client.post("/api/predict", files=upload(("bad.nii.gz", b"\x1f\x8b" + b"garbage" * 10)))
    assert broken.status_code == 415 and "cannot read volume bad.nii.gz" in broken.json()["detail"]


def test_a_2000_character_boundary_is_a_400(client):
    boundary = "b" * 2000
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n").encode() \
        + png_bytes() + f"\r\n--{boundary}--\r\n".encode()
    response = client.post("/api/predict", content=body,
                           headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 400 and "malformed multipart body" in response.json()["detail"]


def test_memory_budget_shares_and_reservations():
    from braintumor.serve.budget import BudgetFull, MemoryBudget, Reservation

    budget = MemoryBudget(1000, large_share=0.5, small_item=100)
    with pytest.raises(BudgetFull) as refused:
        budget.acquire(600)  # large, and more than the large share: never
    assert refused.value.too_large
    with Reservation(budget) as big:
        for _ in range(5):
            big.add(90)  # crosses 100 bytes: moves to the large share
        assert big.large and budget.in_use == budget.in_use_large == 450
        with pytest.raises(BudgetFull) as full:
            big.add(90)  # the large share (500) is full ...
        assert not full.value.too_large
        with Reservation(budget) as small:
            small.add(90)  # ... but the rest still takes small items
            assert budget.in_use == 540
    assert budget.in_use == budget.in_use_large == 0 and budget.peak == 540


def test_a_full_budget_is_503_with_retry_after_and_a_too_large_decode_is_413(classifier):
    big_png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1100, 1100), dtype=np.uint8)).save(big_png, "PNG")
    app = create_app(classifier, budget_bytes=4 * 2**20, budget_wait_seconds=0.0)
    budget = app.state.budget
    with TestClient(app) as test_client:
        budget.acquire(budget.capacity - 1000)  # other requests hold nearly everything
        busy = test_client.post("/api/predict", files=upload(("a.png", png_bytes())))
        assert busy.status_code == 503 and busy.headers["retry-after"].isdigit()
        assert busy.headers["connection"] == "close"  # the rest of a refused upload is not read
        assert "busy" in busy.json()["detail"]
        budget.release(budget.capacity - 1000, large=False)
        assert test_client.post("/api/predict", files=upload(("a.png", png_bytes()))).status_code == 200

        small = create_app(classifier, budget_bytes=2 * 2**20)
        with TestClient(small) as small_client:
            response = small_client.post("/api/predict", files=upload(("big.png", big_png.getvalue())))
        assert response.status_code == 413 and response.json()["detail"].startswith("big.png: needs about")
        assert small.state.budget.in_use == 0

        # A volume is sized from its header (nothing inflated): refused before it is read.
        sys.path.insert(0, str(REPO / "tests"))
        from bombs import nifti_bomb

        with TestClient(create_app(classifier, budget_bytes=64 * 2**20)) as small_client:
            response = small_client.post("/api/predict", files=upload(("deep.nii.gz", nifti_bomb((512, 512, 8),
                                                                                                 "int16"))))
        assert response.status_code == 413 and response.json()["detail"].startswith("deep.nii.gz: needs about")
    assert budget.in_use == 0


@pytest.fixture()
def live_server(classifier):
    """uvicorn with this package's settings and short slow-client limits, on a free loopback port."""
    import threading

    import uvicorn

    from braintumor.serve.app import uvicorn_options

    options = uvicorn_options(header_timeout=0.5, body_grace=0.5, min_body_rate=1000)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(classifier), log_level="warning", **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.05)
    yield listener.getsockname(), options["http"]
    server.should_exit = True
    thread.join(timeout=10)
    listener.close()


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a generous socket timeout: not a timing test)."""
    sock.settimeout(30)
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def test_slow_header_and_slow_body_clients_are_closed(live_server):
    address, protocol = live_server
    slow_headers = []
    for _ in range(5):
        sock = socket.create_connection(address)
        sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the rest
        slow_headers.append(sock)
    slow_body = socket.create_connection(address)
    slow_body.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
                      b"Content-Length: 100000\r\n\r\n--B\r\n")  # then nothing: 5 bytes of 100000
    idle = socket.create_connection(address)  # connects and says nothing
    for sock in slow_headers:
        assert _read_until_closed(sock).startswith(b"HTTP/1.1 408")
    assert _read_until_closed(slow_body).startswith(b"HTTP/1.1 408")
    assert _read_until_closed(idle) == b""
    for sock in (*slow_headers, slow_body, idle):
        sock.close()
    assert protocol.closed_slow == 7
    # A prompt client is served as before.
    import httpx

    response = httpx.post(f"http://{address[0]}:{address[1]}/api/predict", files=upload(("a.png", png_bytes())),
                          timeout=60)
    assert response.status_code == 200
