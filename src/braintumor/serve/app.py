"""The web page and JSON API: one shared Classifier behind FastAPI, served by uvicorn.

Uploads are parsed as they stream in (python-multipart's push parser), kept in memory and decoded from
memory: nothing is written to disk, so nothing outlives the request, and a file over the per-file limit is
refused as soon as its bytes pass the limit instead of after it has been stored. Inference runs in worker
threads; plain forward passes may run side by side, while Grad-CAM (which hooks the shared model) runs alone.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from braintumor import RESEARCH_NOTE
from braintumor.errors import UserError
from braintumor.data.io import ImageReadError, estimate_decode_bytes, read_image
from braintumor.serve.budget import DEFAULT_DECODE_BUDGET_BYTES, DecodeBudget

STATIC_DIR = Path(__file__).with_name("static")
FIELD = "files"
PREVIEW_SIZE = 256  # longest side of the preview PNG returned with ?preview=1
_FORM_FIELD_LIMIT = 64 * 1024  # non-file form fields are ignored, but never buffered without bound
_PART_OVERHEAD = 16 * 1024  # multipart boundary and part headers allowed per file in the request total
_SECURITY_HEADERS = {
    # Everything the page needs comes from this server; images arrive as data: URLs.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
LARGE_DECODE_BYTES = 32 * 2**20  # uploads estimated to need more than this decode in the large lane
LARGE_DECODE_NICENESS = 10
_MULTIPART_HELP = "send multipart/form-data with one or more image files in the field 'files'"


@dataclass
class Upload:
    """One uploaded file, held in memory only."""

    filename: str
    data: bytes


def _human(n_bytes: int) -> str:
    for unit, size in (("MiB", 2**20), ("KiB", 1024)):
        if n_bytes >= size:
            value = n_bytes / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n_bytes} bytes"


class _UploadCollector:
    """python-multipart callbacks that collect the 'files' parts in memory, enforcing the limits as bytes arrive."""

    def __init__(self, max_file_bytes: int, max_files: int):
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files
        self.uploads: list[Upload] = []
        self.finished = False
        self._headers: dict[bytes, bytes] = {}
        self._header_name = b""
        self._header_value = b""
        self._filename: str | None = None
        self._buffer = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (
            "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
            "on_part_data", "on_part_end", "on_end")}

    def on_part_begin(self) -> None:
        self._headers, self._filename, self._buffer = {}, None, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b"").decode("latin-1"))
        if b"name" not in options:
            raise HTTPException(400, f"a multipart part has no field name; {_MULTIPART_HELP}")
        field = options[b"name"].decode("utf-8", "replace")
        if b"filename" not in options:
            if field == FIELD:
                raise HTTPException(422, f"the field 'files' holds text, not a file; {_MULTIPART_HELP}")
            return  # another form field: ignored
        if field != FIELD:
            raise HTTPException(422, f"unexpected file field {field!r}; {_MULTIPART_HELP}")
        if len(self.uploads) >= self.max_files:
            raise HTTPException(413, f"too many files: at most {self.max_files} per request")
        # Some clients send a full path; only the last component names the file.
        name = options[b"filename"].decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
        self._filename = name or f"file {len(self.uploads) + 1}"

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        limit = self.max_file_bytes if self._filename is not None else _FORM_FIELD_LIMIT
        if len(self._buffer) + (end - start) > limit:
            if self._filename is None:
                raise HTTPException(413, f"a form field is larger than {_human(limit)}")
            raise HTTPException(413, f"file {self._filename!r} is larger than the limit of {_human(limit)} per file")
        self._buffer += data[start:end]

    def on_part_end(self) -> None:
        if self._filename is not None:
            self.uploads.append(Upload(self._filename, bytes(self._buffer)))
        self._buffer = bytearray()

    def on_end(self) -> None:
        self.finished = True


async def read_uploads(request: Request, max_file_bytes: int, max_files: int) -> list[Upload]:
    """Parse the multipart body as it streams in; 413 as soon as a limit is passed, 400/415/422 for bad bodies."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise HTTPException(415, f"unsupported request body {content_type.decode('latin-1') or '(none)'!r}; "
                                 f"{_MULTIPART_HELP}")
    if not params.get(b"boundary"):
        raise HTTPException(400, f"multipart body without a boundary; {_MULTIPART_HELP}")
    max_request_bytes = max_files * (max_file_bytes + _PART_OVERHEAD) + _FORM_FIELD_LIMIT
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
        raise HTTPException(413, f"request body of {_human(int(declared))} exceeds the limit of "
                                 f"{_human(max_request_bytes)} ({max_files} files of {_human(max_file_bytes)})")
    collector = _UploadCollector(max_file_bytes, max_files)
    try:
        parser = MultipartParser(params[b"boundary"], collector.callbacks())
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_request_bytes:
                raise HTTPException(413, f"request body exceeds the limit of {_human(max_request_bytes)}")
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as err:
        raise HTTPException(400, f"malformed multipart body ({err}); {_MULTIPART_HELP}") from None
    if not collector.finished:
        raise HTTPException(400, f"incomplete multipart body (no closing boundary); {_MULTIPART_HELP}")
    if not collector.uploads:
        raise HTTPException(422, f"no files received; {_MULTIPART_HELP}")
    return collector.uploads


def png_base64(image: Image.Image) -> str:
    """A PIL image as base64-encoded PNG text."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def preview_size(image: Image.Image, size: int = PREVIEW_SIZE) -> tuple[int, int]:
    """The image's width and height scaled down (never up) to at most ``size`` px on the longest side."""
    scale = min(1.0, size / max(image.size))
    return max(1, round(image.width * scale)), max(1, round(image.height * scale))


def preview_image(image: Image.Image, size: int = PREVIEW_SIZE) -> Image.Image:
    """A copy at most ``size`` px on its longest side (browsers cannot show DICOM, so the page shows this)."""
    target = preview_size(image, size)
    return image.copy() if target == image.size else image.resize(target, Image.Resampling.LANCZOS)


class Analyzer:
    """Decode, predict and explain uploads with one shared Classifier; called from worker threads."""

    def __init__(self, classifier, decode_budget: DecodeBudget | None = None):
        self.classifier = classifier
        self.decode_budget = decode_budget or DecodeBudget()

    def model_info(self) -> dict[str, Any]:
        info = self.classifier.describe()
        return {key: info[key] for key in ("arch", "classes", "image_size", "backend", "fingerprint")}

    @staticmethod
    def decode_cost(upload: Upload) -> int:
        """Estimated peak bytes of decoding an upload (read from its header; nothing is decoded)."""
        return estimate_decode_bytes(upload.data, upload.filename) + len(upload.data)

    def decode(self, upload: Upload, cost: int | None = None) -> Image.Image:
        """Decode one upload by its file name's rules (as the command line reads files), within the budget."""
        try:
            # Decode memory is budgeted server-wide: concurrent large uploads wait their turn.
            with self.decode_budget.hold(self.decode_cost(upload) if cost is None else cost):
                image = read_image(upload.data, name=upload.filename)
        except ImageReadError as err:
            raise HTTPException(415, f"{upload.filename}: not a readable image or DICOM ({err.reason})") from None
        upload.data = b""  # decoded: the encoded bytes need not stay in memory for the rest of the request
        return image

    def read_volume(self, upload: Upload):
        """The upload as a Volume when it is a NIfTI file or a multi-frame DICOM, else None (read it as a slice)."""
        from braintumor.data.volumes import read_volume_bytes

        try:
            volume = read_volume_bytes(upload.data, upload.filename)
        except UserError as err:
            raise HTTPException(415, str(err)) from None
        if volume is not None:
            upload.data = b""  # read: the encoded bytes need not stay in memory for the rest of the request
        return volume

    def __call__(self, uploads: list[Upload], *, explain: bool, preview: bool, target: str | None,
                 images: list[Image.Image | None] | None = None, volumes: list | None = None) -> dict:
        from braintumor.inference.volume_verdict import classify_volume

        if volumes is None:
            volumes = [self.read_volume(upload) for upload in uploads]
        if images is None:
            images = [None if volume is not None else self.decode(upload)
                      for upload, volume in zip(uploads, volumes)]
        slices = [image for image in images if image is not None]
        predictions = iter(self.classifier.predict(slices) if slices else [])
        results, summaries = [], []
        for upload, image, volume in zip(uploads, images, volumes):
            summary = classify_volume(self.classifier, volume) if volume is not None else None
            summaries.append(summary)
            if volume is None:
                p = next(predictions)
                results.append({"filename": upload.filename, "label": p.label, "confidence": p.confidence,
                                "probabilities": p.probabilities, "status": p.status,
                                "out_of_distribution": p.out_of_distribution, "ood_score": p.ood_score,
                                "abstained": p.abstained, "width": image.width, "height": image.height})
            else:
                results.append(self._volume_result(upload.filename, volume, summary))
        shown = [image if image is not None else volume.images()[result["volume"]["key_slice"]]
                 for image, volume, result in zip(images, volumes, results)]
        if preview:
            for result, image in zip(results, shown):
                result["preview_png_base64"] = png_base64(preview_image(image))
        if explain:
            self._explain(results, shown, volumes, summaries, target)
        return {"model": self.model_info(), "results": results, "note": RESEARCH_NOTE}

    def _volume_result(self, filename: str, volume, summary) -> dict:
        """A volume's card: its verdict as the label, the most suspicious slice's probabilities, the details."""
        row = summary.probabilities[summary.key_slice]
        classes = self.classifier.classes
        confidence = float(row[classes.index(summary.verdict)]) if summary.verdict in classes else float(row.max())
        details = summary.to_dict()
        details["source"] = filename
        height, width = volume.slices.shape[1:]
        return {"filename": filename, "label": summary.verdict, "confidence": confidence,
                "probabilities": {c: float(p) for c, p in zip(classes, row)}, "width": width, "height": height,
                "volume": details}

    def _explain(self, results: list[dict], shown: list, volumes: list, summaries: list, target: str | None) -> None:
        from braintumor.inference.volume_verdict import explained_class, montage_image

        # Grad-CAM hooks the shared model's last block: explain() holds the classifier's lock for writing,
        # so no plain forward pass (which reads under the same lock) can land in the hooks meanwhile.
        try:
            plain = [k for k, volume in enumerate(volumes) if volume is None]
            explanations = dict(zip(plain, self.classifier.explain([shown[k] for k in plain], target=target)
                                    if plain else []))
            for k, summary in enumerate(summaries):
                if summary is not None:  # a volume: its key slice, explaining its tumour verdict by default
                    chosen = target if target is not None else explained_class(summary)
                    explanations[k] = self.classifier.explain(shown[k], target=chosen)
                    results[k]["volume_montage_png_base64"] = png_base64(
                        montage_image(self.classifier, volumes[k], summary))
        except UserError as err:  # e.g. an ONNX model has no gradients
            raise HTTPException(422, f"Grad-CAM is not available: {err}") from None
        for k, result in enumerate(results):
            # The map is at the model's input size; give it the preview's geometry so the two line up.
            overlay = explanations[k].overlay().resize(preview_size(shown[k]), Image.Resampling.BILINEAR)
            heatmap = explanations[k].overlay(alpha=1.0).resize(preview_size(shown[k]), Image.Resampling.BILINEAR)
            result["gradcam_target"] = explanations[k].target
            result["gradcam_png_base64"] = png_base64(overlay)
            # The colour-mapped map alone, for the page to lay over the slice at an opacity the user picks.
            result["gradcam_heatmap_png_base64"] = png_base64(heatmap)


def create_app(classifier, *, max_file_bytes: int = 20 * 2**20, max_files: int = 16,
               inference_threads: int | None = None, decode_budget_bytes: int | None = None) -> FastAPI:
    """The FastAPI app: page at /, static files, /api/health, /api/model, /api/predict, docs at /docs.

    ``inference_threads`` bounds how many requests run the model at once (default: the CPU count, at most 8);
    ``decode_budget_bytes`` bounds the estimated memory of all decodes in flight (default 1 GiB).
    """
    max_file_bytes, max_files = int(max_file_bytes), int(max_files)
    if max_file_bytes < 1 or max_files < 1:
        raise UserError("the upload limits must be positive: at least 1 byte per file and 1 file per request")
    if inference_threads is not None and int(inference_threads) < 1:
        raise UserError("the number of inference threads must be at least 1")
    threads = int(inference_threads or min(8, os.cpu_count() or 1))
    analyzer = Analyzer(classifier, DecodeBudget(decode_budget_bytes or DEFAULT_DECODE_BUDGET_BYTES))
    app = FastAPI(title="braintumor", version=_version(), docs_url=None, redoc_url=None,
                  description=f"Classify 2-D brain MRI slices (JPEG, PNG, DICOM) and volumes (NIfTI, "
                              f"multi-frame DICOM) slice by slice. {RESEARCH_NOTE}")
    app.state.analyzer = analyzer
    app.state.limiter = None  # made on first use: it belongs to the running event loop
    _add_pages(app)

    @app.get("/api/model", summary="The loaded model and the upload limits")
    async def model() -> dict:
        return {**classifier.describe(), "note": RESEARCH_NOTE, "gradcam": classifier.model is not None,
                "limits": {"max_file_bytes": max_file_bytes, "max_files": max_files}}

    @app.post("/api/predict", summary="Classify one or more slices", openapi_extra=_predict_openapi(max_files))
    async def predict(
        request: Request,
        explain: bool = Query(False, description="add a Grad-CAM overlay PNG (base64) per file"),
        preview: bool = Query(False, description=f"add a preview PNG (base64, at most {PREVIEW_SIZE} px)"),
        target: str | None = Query(None, description="class explained by Grad-CAM (default: the predicted one)"),
    ) -> dict:
        """Predicted class and per-class probabilities for each file in the multipart field ``files``."""
        if target is not None and target not in classifier.classes:
            raise HTTPException(422, f"unknown target class {target!r}; choose one of {', '.join(classifier.classes)}")
        uploads = await read_uploads(request, max_file_bytes, max_files)
        if app.state.limiter is None:
            app.state.limiter = anyio.CapacityLimiter(threads)
            # Uploads that decode to large images take a lane of their own: one thread, at a lower CPU priority,
            # so they can neither occupy the threads that ordinary requests need nor crowd out their CPU time.
            app.state.large_lane = ThreadPoolExecutor(1, thread_name_prefix="large-decode",
                                                      initializer=_nice_this_thread)
        images, volumes = await _decode_uploads(app, analyzer, uploads)

        def work() -> dict:
            return analyzer(uploads, explain=explain, preview=preview, target=target, images=images, volumes=volumes)

        return await anyio.to_thread.run_sync(work, limiter=app.state.limiter)

    return app


def _add_pages(app: FastAPI) -> None:
    """Security headers on every response; the page, its static files, the offline API docs, /api/health."""

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for key, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        # FastAPI's Swagger UI loads from a CDN; this page renders /openapi.json with local files only.
        return FileResponse(STATIC_DIR / "docs.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/health", summary="Liveness check")
    async def health() -> dict:
        return {"status": "ok"}


async def _decode_uploads(app: FastAPI, analyzer: Analyzer, uploads: list[Upload]) -> tuple[list, list]:
    """(images, volumes), one entry each per upload (None where the other applies), decoded in worker threads;
    uploads estimated to decode large go through the app's single low-priority lane."""
    images, volumes = [], []
    for upload in uploads:
        volume = await anyio.to_thread.run_sync(analyzer.read_volume, upload, limiter=app.state.limiter)
        volumes.append(volume)
        if volume is not None:
            images.append(None)
            continue
        cost = await anyio.to_thread.run_sync(analyzer.decode_cost, upload, limiter=app.state.limiter)
        if cost > LARGE_DECODE_BYTES:
            image = await asyncio.get_running_loop().run_in_executor(app.state.large_lane, analyzer.decode,
                                                                     upload, cost)
        else:
            image = await anyio.to_thread.run_sync(analyzer.decode, upload, cost, limiter=app.state.limiter)
        images.append(image)
    return images, volumes


def _nice_this_thread() -> None:
    """Lower this thread's CPU priority (Linux threads have their own nice value); a no-op where unsupported."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + LARGE_DECODE_NICENESS))
    except (OSError, AttributeError):
        pass


def _predict_openapi(max_files: int) -> dict:
    """The request body for the docs: the handler streams it itself, so FastAPI cannot infer it."""
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [FIELD],
        "properties": {FIELD: {"type": "array", "maxItems": max_files,
                               "items": {"type": "string", "format": "binary"},
                               "description": "JPEG, PNG, BMP, TIFF or DICOM slices; NIfTI (.nii, .nii.gz) "
                                              "or multi-frame DICOM volumes"}}}}}},
        "responses": {"413": {"description": "a file or the request is over the size or count limit"},
                      "415": {"description": "a file is not a readable image or DICOM"}}}


def _version() -> str:
    from braintumor import __version__

    return __version__


def _check_port(host: str, port: int) -> None:
    """Fail with one clear line when the address is taken, instead of uvicorn's log and exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); "
                            "choose another --port or --host") from None


def run_server(checkpoint, host: str = "127.0.0.1", port: int = 8000, *, max_file_bytes: int = 20 * 2**20,
               max_files: int = 16, workers_threads: int | None = None, device: str = "cpu",
               backend: str = "torch", tta: bool | None = None, min_confidence: float = 0.0) -> None:
    """Load ``checkpoint`` and serve the page and API with uvicorn until interrupted (127.0.0.1 by default)."""
    import uvicorn  # the [serve] extra, checked in serve/__init__.py

    from braintumor.inference.classifier import Classifier

    if not 0 <= int(port) <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")
    classifier = Classifier.from_checkpoint(checkpoint, device=device, backend=backend, tta=tta)
    classifier.min_confidence = min_confidence
    app = create_app(classifier, max_file_bytes=max_file_bytes, max_files=max_files,
                     inference_threads=workers_threads)
    _check_port(host, int(port))
    shown_host = f"[{host}]" if ":" in host else host
    print(f"braintumor: serving {classifier.arch} (checkpoint {classifier.fingerprint}) at "
          f"http://{shown_host}:{port}/  API docs at /docs. {RESEARCH_NOTE}", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: bound to {host}, so other machines can reach this server; it has no authentication",
              flush=True)
    uvicorn.run(app, host=host, port=int(port), log_level="info")
