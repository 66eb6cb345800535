"""The web page and JSON API: one shared Classifier behind FastAPI, served by uvicorn.

Uploads are parsed as they stream in (python-multipart's push parser), kept in memory and decoded from
memory: nothing is written to disk, so nothing outlives the request, and a file over the per-file limit is
refused as soon as its bytes pass the limit instead of after it has been stored. One process-wide memory budget
(:mod:`braintumor.serve.budget`) counts the upload bytes of every request in flight and the estimated memory of
every decode: when it is full a request gets 503 with Retry-After, and a file that alone needs more than the
server allows gets 413. Slow clients are closed (:mod:`braintumor.serve.connections`). Inference runs in
worker threads; large decodes (volumes, bombs) in a single low-priority lane of their own.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import os
import socket
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from python_multipart.exceptions import FormParserError
from starlette.requests import ClientDisconnect
from python_multipart.multipart import MultipartParser, parse_options_header

from braintumor import RESEARCH_NOTE
from braintumor.data.dicom import has_dicom_magic
from braintumor.data.io import ImageReadError, estimate_decode_bytes, read_image
from braintumor.errors import UserError
from braintumor.inference import service
from braintumor.serve.budget import (DEFAULT_BUDGET_BYTES, RETRY_AFTER_SECONDS, BudgetFull, MemoryBudget,
                                     Reservation, malloc_trim, tune_allocator)
from braintumor.serve.schema import PREVIEW_SIZE, PredictResponse

STATIC_DIR = Path(__file__).with_name("static")
FIELD = "files"
BUDGET_WAIT_SECONDS = 5.0  # how long a decode may wait for room in the budget before the request gets 503
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
    size: int = field(default=0)  # bytes received (kept after ``data`` is dropped, to give the budget back)


def _human(n_bytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 1024)):
        if n_bytes >= size:
            value = n_bytes / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n_bytes} bytes"


def _busy(what: str) -> HTTPException:
    """503 with Retry-After: the server's memory budget is full for now."""
    return HTTPException(503, f"the server is busy ({what}); retry in a few seconds",
                         headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


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
        field_name = options[b"name"].decode("utf-8", "replace")
        if b"filename" not in options:
            if field_name == FIELD:
                raise HTTPException(422, f"the field 'files' holds text, not a file; {_MULTIPART_HELP}")
            return  # another form field: ignored
        if field_name != FIELD:
            raise HTTPException(422, f"unexpected file field {field_name!r}; {_MULTIPART_HELP}")
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
            self.uploads.append(Upload(self._filename, bytes(self._buffer), len(self._buffer)))
        self._buffer = bytearray()

    def on_end(self) -> None:
        self.finished = True


async def read_uploads(request: Request, max_file_bytes: int, max_files: int,
                       reservation: Reservation | None = None) -> list[Upload]:
    """Parse the multipart body as it streams in; 413 as soon as a limit is passed, 400/415/422 for bad bodies,
    503 when ``reservation`` (the request's share of the server's memory budget) cannot hold the next chunk."""
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
                                 f"{_human(max_request_bytes)} ({max_files} files of {_human(max_file_bytes)})",
                            headers={"Connection": "close"})
    try:
        return await _collect(request, params[b"boundary"], max_file_bytes, max_files, max_request_bytes, reservation)
    except HTTPException as err:
        # Refused before the body was read to its end: close the connection after the answer, rather than read
        # (and discard) the rest of an upload that may be hundreds of MB.
        err.headers = {**(err.headers or {}), "Connection": "close"}
        raise


async def _collect(request: Request, boundary: bytes, max_file_bytes: int, max_files: int, max_request_bytes: int,
                   reservation: Reservation | None) -> list[Upload]:
    collector = _UploadCollector(max_file_bytes, max_files)
    try:
        parser = MultipartParser(boundary, collector.callbacks())
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_request_bytes:
                raise HTTPException(413, f"request body exceeds the limit of {_human(max_request_bytes)}")
            if reservation is not None:
                try:
                    reservation.add(len(chunk))
                except BudgetFull as full:
                    if full.too_large:
                        raise HTTPException(413, f"request body exceeds what this server holds at once "
                                                 f"({_human(full.available)})") from None
                    raise _busy("too many uploads in flight") from None
            parser.write(chunk)
        parser.finalize()
    except FormParserError as err:  # every python-multipart error, the boundary's length included
        raise HTTPException(400, f"malformed multipart body ({err}); {_MULTIPART_HELP}") from None
    except ClientDisconnect:  # the client left (or was closed for sending too slowly): nobody reads an answer
        raise HTTPException(400, "the client disconnected before the request body was complete") from None
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


def _nifti_shape(data: bytes) -> tuple[tuple[int, ...], int] | None:
    """(shape, bits per voxel) from a (gzipped) NIfTI-1/2 header, inflating no more than the header; None if the
    bytes are not NIfTI."""
    head = data[:600]
    if data[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(wbits=31).decompress(data[:64 * 1024], 600)
        except zlib.error:
            return None
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348 and head[344:348] in (b"n+1\0",
                                                                                                     b"ni1\0"):
            dims, bits = struct.unpack(order + "8h", head[40:56]), struct.unpack(order + "h", head[72:74])[0]
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540 and head[4:8] == b"n+2\0":
            dims, bits = struct.unpack(order + "8q", head[16:80]), struct.unpack(order + "h", head[14:16])[0]
            break
    else:
        return None
    count = max(0, min(int(dims[0]), 7))
    return tuple(max(1, int(size)) for size in dims[1:1 + count]), max(8, int(bits))


def _nifti_decode_bytes(data: bytes) -> int | None:
    """Estimated peak bytes of reading a NIfTI upload and classifying its slices; None if it is not NIfTI.

    What ``data.volumes`` holds while it reads (the inflated stream of a gzipped upload, blocks of float32 voxels,
    the stored 8-bit slices, reduced in-plane to at most MAX_SIDE and MAX_STORED_VOXELS) and what the service
    adds (every slice as an RGB image, a batch of tensors).
    """
    from braintumor.data import volumes

    found = _nifti_shape(data)
    if found is None:
        return None
    shape, bits = found
    voxels = math.prod(shape)
    x, y = (shape + (1, 1))[:2]
    planes = voxels // max(1, x * y)
    side_limit = getattr(volumes, "MAX_SIDE", None) or max(x, y)
    factor = max(1, -(-max(x, y) // side_limit))
    stored = min(voxels, getattr(volumes, "MAX_STORED_VOXELS", voxels), -(-x // factor) * -(-y // factor) * planes)
    inflated = voxels * bits // 8 if data[:2] == b"\x1f\x8b" else 0
    return len(data) + inflated + 64 * 2**20 + 5 * stored


class Analyzer:
    """Decode, predict and explain uploads with one shared Classifier; called from worker threads.

    The memory budget is held around each file's decode (and a volume's whole analysis, which decodes it).
    """

    def __init__(self, classifier, budget: MemoryBudget | None = None, *, wait_seconds: float = BUDGET_WAIT_SECONDS):
        self.classifier = classifier
        self.budget = budget or MemoryBudget()
        self.wait_seconds = wait_seconds

    def model_info(self) -> dict[str, Any]:
        info = self.classifier.describe()
        return {key: info[key] for key in ("arch", "classes", "image_size", "backend", "fingerprint")}

    @staticmethod
    def decode_cost(upload: Upload) -> int:
        """Estimated peak bytes of decoding an upload (read from its header; nothing is decoded)."""
        data = upload.data
        volume = _nifti_decode_bytes(data)
        if volume is not None:
            return volume
        estimate = estimate_decode_bytes(data, upload.filename) + len(data)
        if has_dicom_magic(data[:132]):
            estimate = max(estimate, 12 * len(data))  # multi-frame: every frame, through the volume pipeline
        return estimate

    def too_large(self, upload: Upload, cost: int, allowed: int) -> HTTPException:
        return HTTPException(413, f"{upload.filename}: needs about {_human(cost)} of memory to decode, more than "
                                  f"this server allows for one file ({_human(allowed)})")

    def check_cost(self, upload: Upload, cost: int) -> None:
        """413 at once for a file that alone needs more than the budget ever gives one file."""
        allowed = self.budget.limit_for(cost)
        if cost > allowed:
            raise self.too_large(upload, cost, allowed)

    @contextmanager
    def budgeted(self, upload: Upload, cost: int) -> Iterator[None]:
        """Hold ``cost`` bytes of the server's budget: 413 when one file alone needs more than the server allows,
        503 when the budget stays full for ``wait_seconds``."""
        try:
            with self.budget.hold(cost, timeout=self.wait_seconds):
                yield
        except BudgetFull as full:
            if full.too_large:
                raise self.too_large(upload, cost, full.available) from None
            raise _busy("decoding other uploads") from None

    def read(self, upload: Upload, cost: int, options: "Options"):
        """Decode one upload within the budget: a 2-D slice as an image, a volume as its finished result (a
        volume is analysed while its decode memory is held)."""
        with self.budgeted(upload, cost):
            volume = self.read_volume(upload)
            if volume is None:
                return self.decode(upload)
            try:
                return self.analyze_volume(upload.filename, volume, options)
            finally:
                del volume
                malloc_trim()

    def decode(self, upload: Upload) -> Image.Image:
        """Decode one upload by its file name's rules (as the command line reads files)."""
        try:
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

    # --- results: every prediction, status and explanation comes from braintumor.inference.service --------------

    def finish_slices(self, names: list[str], images: list[Image.Image], options: "Options") -> list[dict[str, Any]]:
        """The request's 2-D slices, predicted in one batch; previews and explanations when asked for."""
        results = []
        for prediction, image in zip(service.predict_items(self.classifier, images, sources=names), images):
            result = prediction.to_dict()
            result.update(width=image.width, height=image.height)
            if options.preview:
                result["preview_png_base64"] = png_base64(preview_image(image))
            if options.explain:
                result["explanation"] = self.explanation(image, prediction.source, options.target, options)
            results.append(result)
        return results

    def analyze_volume(self, name: str, volume, options: "Options") -> dict[str, Any]:
        """A volume's card: its key slice's prediction (labelled as that slice's), with the volume's own status,
        verdict and every slice's prediction under ``volume_prediction``."""
        from braintumor.inference.volume_verdict import explained_class, montage_image

        outcome = service.predict_volume(self.classifier, volume)
        summary = outcome.summary()
        details = summary.to_dict()
        details.pop("montage", None)
        key = summary.slices[summary.key_slice] if summary.slices else None
        result = key.to_dict() if key is not None else {
            "source": name, "predicted_class": None, "confidence": None, "probabilities": {},
            "status": summary.status, "volume": name, "slice_index": None}
        height, width = volume.slices.shape[1:]
        result.update(width=int(width), height=int(height), volume_prediction=details)
        if key is None:
            return result
        shown = Image.fromarray(volume.slices[summary.key_slice], mode="L").convert("RGB")
        if options.preview:
            result["preview_png_base64"] = png_base64(preview_image(shown))
        if options.explain:
            chosen = options.target if options.target is not None else explained_class(outcome)
            result["explanation"] = self.explanation(shown, key.source, chosen, options)
            with self._explaining():
                details["montage_png_base64"] = png_base64(montage_image(self.classifier, volume, outcome,
                                                                           method=options.method,
                                                                           layer=options.layer,
                                                                           mirror=options.mirror))
        return result

    @contextmanager
    def _explaining(self) -> Iterator[None]:
        try:
            yield
        except UserError as err:  # e.g. an export has no gradients, an unknown layer
            raise HTTPException(422, f"explanations are not available: {err}") from None

    def explanation(self, image: Image.Image, source: str, target: str | None, options: "Options") -> dict[str, Any]:
        """The explanation of one slice (the service's), as PNGs at the preview's geometry."""
        with self._explaining():
            [explained] = service.explain_items(self.classifier, [image], sources=[source], target=target,
                                                method=options.method, layer=options.layer,
                                                mirror=options.mirror)
        size = preview_size(image)
        overlay = explained.overlay().resize(size, Image.Resampling.BILINEAR)
        heatmap = explained.overlay(alpha=1.0).resize(size, Image.Resampling.BILINEAR)
        return {"method": explained.method, "layer": explained.layer,
                "mirror": explained.mirror, "target": explained.target,
                "overlay_png_base64": png_base64(overlay), "heatmap_png_base64": png_base64(heatmap)}


@dataclass(frozen=True)
class Options:
    """What a request asked for besides the predictions."""

    preview: bool = False
    explain: bool = False
    method: str | None = None
    layer: str | None = None
    mirror: bool | None = None
    target: str | None = None


@dataclass(frozen=True)
class ExplainChoices:
    """What the server offers for explanations, read from ``braintumor.visualize.explain`` (their one home)."""

    methods: tuple[str, ...]
    default_method: str
    labels: dict[str, str]
    default_mirror: bool

    @classmethod
    def current(cls) -> "ExplainChoices":
        from braintumor.visualize.explain import DEFAULT_METHOD, DEFAULT_MIRROR, METHOD_LABELS, METHODS

        return cls(tuple(METHODS), DEFAULT_METHOD, {name: METHOD_LABELS.get(name, name) for name in METHODS},
                   DEFAULT_MIRROR)


def create_app(classifier, *, max_file_bytes: int = 20 * 2**20, max_files: int = 16,
               inference_threads: int | None = None, budget_bytes: int | None = None,
               budget_wait_seconds: float = BUDGET_WAIT_SECONDS, decode_budget_bytes: int | None = None) -> FastAPI:
    """The FastAPI app: page at /, static files, /api/health, /api/model, /api/predict, docs at /docs.

    ``inference_threads`` bounds how many requests run the model at once (default: the CPU count, at most 8);
    ``budget_bytes`` bounds the memory of all uploads in flight and all decodes together (default 1 GiB;
    ``decode_budget_bytes`` is its former name); a decode waits at most ``budget_wait_seconds`` for room.
    """
    max_file_bytes, max_files = int(max_file_bytes), int(max_files)
    if max_file_bytes < 1 or max_files < 1:
        raise UserError("the upload limits must be positive: at least 1 byte per file and 1 file per request")
    if inference_threads is not None and int(inference_threads) < 1:
        raise UserError("the number of inference threads must be at least 1")
    threads = int(inference_threads or min(8, os.cpu_count() or 1))
    budget = MemoryBudget(int(budget_bytes or decode_budget_bytes or DEFAULT_BUDGET_BYTES))
    analyzer = Analyzer(classifier, budget, wait_seconds=budget_wait_seconds)
    explaining = ExplainChoices.current()
    app = FastAPI(title="braintumor", version=_version(), docs_url=None, redoc_url=None,
                  description=f"Classify 2-D brain MRI slices (JPEG, PNG, DICOM) and volumes (NIfTI, "
                              f"multi-frame DICOM) slice by slice. {RESEARCH_NOTE}")
    app.state.analyzer = analyzer
    app.state.budget = budget
    app.state.limiter = None  # made on first use: it belongs to the running event loop
    _add_pages(app)

    @app.get("/api/model", summary="The loaded model, the explanation methods and the upload limits")
    async def model() -> dict:
        return {**classifier.describe(), "note": RESEARCH_NOTE, "gradcam": classifier.model is not None,
                "explain_methods": list(explaining.methods), "default_explain_method": explaining.default_method,
                "explain_method_labels": explaining.labels, "default_explain_mirror": explaining.default_mirror,
                "limits": {"max_file_bytes": max_file_bytes, "max_files": max_files,
                           "budget_bytes": budget.capacity}}

    @app.post("/api/predict", summary="Classify one or more slices or volumes", response_model=PredictResponse,
              openapi_extra=_predict_openapi(max_files))
    async def predict(
        request: Request,
        explain: bool = Query(False, description="add an explanation (overlay and heat-map PNGs) per file"),
        method: str | None = Query(None, description=f"explanation method: {', '.join(explaining.methods)} "
                                                     f"(default {explaining.default_method})"),
        layer: str | None = Query(None, description="the layer a CAM method reads, e.g. layer3 (default: the "
                                                    "method's own, visualize.explain.DEFAULT_LAYERS)"),
        mirror: bool | None = Query(None, description="average each map with the mirrored slice's map (default: "
                                                      f"{'on' if explaining.default_mirror else 'off'}, "
                                                      "visualize.explain.DEFAULT_MIRROR)"),
        preview: bool = Query(False, description=f"add a preview PNG (base64, at most {PREVIEW_SIZE} px)"),
        target: str | None = Query(None, description="class explained (default: the predicted one)"),
    ) -> dict:
        """Predicted class, per-class probabilities, status and trust scores for each file in the multipart
        field ``files``; a volume also gets its own status, verdict and every slice's prediction."""
        if target is not None and target not in classifier.classes:
            raise HTTPException(422, f"unknown target class {target!r}; choose one of {', '.join(classifier.classes)}")
        if method is not None and method not in explaining.methods:
            raise HTTPException(422, f"unknown explanation method {method!r}; "
                                     f"choose one of {', '.join(explaining.methods)}")
        options = Options(preview=preview, explain=explain, method=method, layer=layer, mirror=mirror, target=target)
        if app.state.limiter is None:
            app.state.limiter = anyio.CapacityLimiter(threads)
            # Uploads that decode to large images take a lane of their own: one thread, at a lower CPU priority,
            # so they can neither occupy the threads that ordinary requests need nor crowd out their CPU time.
            app.state.large_lane = ThreadPoolExecutor(1, thread_name_prefix="large-decode",
                                                      initializer=_nice_this_thread)
        with Reservation(budget) as reservation:
            uploads = await read_uploads(request, max_file_bytes, max_files, reservation)
            results = await _analyze(app, analyzer, uploads, options, reservation)
        return {"model": analyzer.model_info(), "results": results, "note": RESEARCH_NOTE}

    return app


async def _analyze(app: FastAPI, analyzer: Analyzer, uploads: list[Upload], options: Options,
                   reservation: Reservation) -> list[dict]:
    """Every upload's result, in upload order: files are read one at a time (each within the memory budget,
    large ones in the low-priority lane), then the request's 2-D slices are predicted in one batch."""
    results: list[dict | None] = []
    slices: list[tuple[int, str, Image.Image]] = []
    for upload in uploads:
        cost = await anyio.to_thread.run_sync(analyzer.decode_cost, upload, limiter=app.state.limiter)
        analyzer.check_cost(upload, cost)  # a file the budget can never hold is refused before it queues
        if cost > LARGE_DECODE_BYTES:
            read = await asyncio.get_running_loop().run_in_executor(app.state.large_lane, analyzer.read, upload,
                                                                    cost, options)
        else:
            read = await anyio.to_thread.run_sync(analyzer.read, upload, cost, options, limiter=app.state.limiter)
        upload.data = b""
        reservation.give_back(upload.size)
        if isinstance(read, Image.Image):
            try:  # the decoded slice waits for the request's batch: it stays in the budget until then
                reservation.add(len(read.getbands()) * read.width * read.height)
            except BudgetFull:
                raise _busy("decoding other uploads") from None
            slices.append((len(results), upload.filename, read))
            results.append(None)
        else:
            results.append(read)
    if slices:
        def work() -> list[dict]:
            return analyzer.finish_slices([name for _, name, _ in slices], [image for _, _, image in slices], options)

        for (index, _, _), result in zip(slices, await anyio.to_thread.run_sync(work, limiter=app.state.limiter)):
            results[index] = result
    return results  # type: ignore[return-value]


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
        "responses": {"400": {"description": "a malformed multipart body"},
                      "413": {"description": "a file or the request is over the size or count limit, or a file "
                                             "needs more memory to decode than the server allows"},
                      "415": {"description": "a file is not a readable image, DICOM or volume"},
                      "503": {"description": "the server's memory budget is full: retry after Retry-After "
                                             "seconds"}}}


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
               backend: str = "torch", tta: bool | None = None, min_confidence: float = 0.0,
               budget_mb: int | None = None) -> None:
    """Load ``checkpoint`` and serve the page and API with uvicorn until interrupted (127.0.0.1 by default)."""
    import uvicorn  # the [serve] extra, checked in serve/__init__.py

    from braintumor.inference.classifier import Classifier

    if not 0 <= int(port) <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")
    classifier = Classifier.from_checkpoint(checkpoint, device=device, backend=backend, tta=tta)
    classifier.min_confidence = min_confidence
    tune_allocator()  # memory freed after large uploads and decodes goes back to the system
    app = create_app(classifier, max_file_bytes=max_file_bytes, max_files=max_files,
                     inference_threads=workers_threads, budget_bytes=None if budget_mb is None else budget_mb * 2**20)
    _check_port(host, int(port))
    shown_host = f"[{host}]" if ":" in host else host
    print(f"braintumor: serving {classifier.arch} (checkpoint {classifier.fingerprint}) at "
          f"http://{shown_host}:{port}/  API docs at /docs. {RESEARCH_NOTE}", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: bound to {host}, so other machines can reach this server; it has no authentication",
              flush=True)
    uvicorn.run(app, host=host, port=int(port), log_level="info", **uvicorn_options())


def uvicorn_options(**limits: float) -> dict[str, Any]:
    """uvicorn settings of every server this package starts: h11 with header and body deadlines for slow
    clients (``limits``: see :func:`braintumor.serve.connections.guarded_protocol`) and short keep-alive."""
    from braintumor.serve.connections import guarded_protocol

    return {"http": guarded_protocol(**limits), "timeout_keep_alive": 5, "h11_max_incomplete_event_size": 64 * 1024}
