"""The decoded-image cache: where it fits (GPU, host memory or none), and decoding files once into it.

Files are decoded to a uint8 tensor at training size, on the GPU with nvjpeg where possible.
The pixels are those of :func:`braintumor.data.io.read_image` followed by
:func:`braintumor.data.transforms.eval_transform`'s
resize, up to rounding: torchvision.io decodes the 8-bit gray/RGB JPEGs and PNGs for which it gives read_image's
pixels, read_image everything else; tests/test_decode.py checks both paths against the PIL pipeline.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from braintumor.data.io import read_image
from braintumor.data.transforms import resize_to_uint8
from braintumor.errors import UserError

CACHE_MODES = ("auto", "none", "memory", "gpu")
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cache_bytes(n_images: int, image_size: int) -> int:
    """Bytes of a decoded uint8 cache of n_images RGB images of image_size x image_size."""
    return int(n_images) * 3 * int(image_size) ** 2


def _available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (or sysconf), capped by a cgroup v2 memory limit when there is one."""
    available = 0
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if not available:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 0
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            available = min(available, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return available


def choose_cache(
    mode: str,
    n_images: int,
    image_size: int,
    device: str | torch.device,
    *,
    free_gpu_bytes: int | None = None,
    available_ram_bytes: int | None = None,
) -> str:
    """Resolve ``--data-cache`` to "gpu", "memory" or "none".

    "auto": "gpu" on CUDA when the decoded set (N*3*S*S bytes) fits in a quarter of free GPU memory, else "memory"
    when it fits in a quarter of available RAM, else "none". Explicit modes are honoured; "gpu" without a CUDA
    device is a UserError. Memory figures are measured unless given.
    """
    if mode not in CACHE_MODES:
        raise UserError(f"unknown data cache '{mode}': choose one of {', '.join(CACHE_MODES)}")
    device = torch.device(device)
    if mode == "gpu" and device.type != "cuda":
        raise UserError(f"--data-cache gpu needs a CUDA device, but the device is {device}: use memory or auto")
    if mode != "auto":
        return mode
    needed = cache_bytes(n_images, image_size)
    if device.type == "cuda":
        if free_gpu_bytes is None:
            free_gpu_bytes = torch.cuda.mem_get_info(device)[0]
        if needed <= free_gpu_bytes / 4:
            return "gpu"
    if available_ram_bytes is None:
        available_ram_bytes = _available_ram_bytes()
    if needed <= available_ram_bytes / 4:
        return "memory"
    return "none"


def _decode_with_pil(path: Path) -> torch.Tensor:
    """Reference decoder (images.read_image): 16-bit, alpha, CMYK, BMP, TIFF, DICOM and anything else."""
    # From the path, not the bytes: read_image's rules (e.g. .dcm without preamble) look at the file name.
    image = read_image(path)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _jpeg_components(data: bytes) -> int | None:
    """Colour components in a JPEG's frame header (1 gray, 3 YCbCr/RGB, 4 CMYK/YCCK); None when not found."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the component count after precision, H, W.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return data[position + 9] if position + 9 < len(data) else None
        position += 2 + length
    return None


def _torchvision_decodes_like_pil(data: bytes) -> bool:
    """True for the files whose torchvision decode equals read_image's pixels: 8-bit gray/RGB JPEG and PNG.

    16-bit PNG (read_image scales it min-max), palette PNG (torchvision returns the indices), alpha (read_image
    composites it on black), CMYK JPEG, BMP, TIFF and DICOM are left to read_image.
    """
    if data.startswith(_JPEG_MAGIC):
        return _jpeg_components(data) in (1, 3)
    if data.startswith(_PNG_MAGIC) and len(data) >= 26 and data[12:16] == b"IHDR":
        bit_depth, colour_type = data[24], data[25]
        return bit_depth <= 8 and colour_type in (0, 2)  # 0 gray, 2 RGB; 3 palette, 4/6 with alpha
    return False


def _decode_cpu(data: bytes, path: Path) -> torch.Tensor:
    """Decode to uint8 (3, H, W) with torchvision where it gives read_image's pixels, else with read_image."""
    if not _torchvision_decodes_like_pil(data):
        return _decode_with_pil(path)
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
    except (RuntimeError, ValueError):
        return _decode_with_pil(path)  # corrupt or truncated: read_image gives the one-line reason
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        return _decode_with_pil(path)
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def _resize(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> uint8 (..., 3, S, S): bilinear with antialias, as eval_transform's Resize."""
    if images.shape[-2:] == (image_size, image_size):
        return images
    # v2's tensor resize uses torch's antialiased bilinear (built to match PIL's) and rounds back to uint8.
    return TF.resize(images.contiguous(), [image_size, image_size], antialias=True)


def _resize_like_eval(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> (3, S, S) by the evaluation preprocessing's own resize (PIL's), so that the CPU cache
    holds exactly the pixels evaluation computes from the same file."""
    if image.shape[-2:] == (image_size, image_size):
        return image
    return resize_to_uint8(Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())), image_size)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""  # read_image then raises its one-line ImageReadError (missing, unreadable, ...)


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="decoding images", unit="img", disable=not (enabled and sys.stderr.isatty()),
                leave=False)


def decode_to_tensor(
    paths: Sequence[str | os.PathLike],
    image_size: int,
    device: str | torch.device = "cpu",
    *,
    pin_memory: bool = False,
    progress: bool = False,
    num_threads: int | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Decode every image once and resize it to uint8 (N, 3, S, S) on ``device``.

    Files are read (and, on CPU, decoded and resized) in a thread pool with torchvision.io. On CUDA, JPEGs are
    decoded with nvjpeg in chunks of ``chunk_size`` and resized on the GPU. Files torchvision cannot decode to the
    same pixels as :func:`braintumor.data.io.read_image` (16-bit, alpha, CMYK, BMP, TIFF, DICOM, ...) are read with
    read_image, which raises ImageReadError for unreadable files. With ``pin_memory`` and a CPU ``device`` the
    result is in page-locked memory (when CUDA is available) for fast asynchronous copies to the GPU.

    On the CPU the pixels are those of the evaluation preprocessing (read_image, then eval_transform's resize):
    torchvision decodes only the files it decodes to read_image's pixels, and images are resized by the same PIL
    resize. On CUDA, images are resized on the GPU (torch's antialiased bilinear), within 1 grey level of that
    for gray-content JPEGs and PNGs (measured on an H200 for nvjpeg too); for colour JPEGs with chroma
    subsampling nvjpeg's chroma upsampling differs from libjpeg's, which can move strongly coloured edges by more.
    """
    device = torch.device(device)
    paths = [Path(p) for p in paths]
    shape = (len(paths), 3, int(image_size), int(image_size))
    if device.type == "cpu":
        out = torch.empty(shape, dtype=torch.uint8, pin_memory=pin_memory and torch.cuda.is_available())
    else:
        out = torch.empty(shape, dtype=torch.uint8, device=device)
    workers = num_threads or min(8, os.cpu_count() or 1)

    def decode_cpu_resized(index: int, data: bytes | None = None) -> None:
        raw = _read_bytes(paths[index]) if data is None else data
        out[index].copy_(_resize_like_eval(_decode_cpu(raw, paths[index]), shape[-1]))

    with ThreadPoolExecutor(max_workers=workers) as pool, _progress_bar(len(paths), progress) as bar:
        if device.type != "cuda":
            for _ in pool.map(decode_cpu_resized, range(len(paths))):
                bar.update(1)
            return out
        for start in range(0, len(paths), chunk_size):
            indices = list(range(start, min(start + chunk_size, len(paths))))
            datas = list(pool.map(lambda i: _read_bytes(paths[i]), indices))
            # Gray and YCbCr JPEGs go to nvjpeg; CMYK and everything else to the CPU path below.
            jpegs = [k for k, data in enumerate(datas) if _torchvision_decodes_like_pil(data)
                     and data.startswith(_JPEG_MAGIC)]
            decoded: dict[int, torch.Tensor] = {}
            if jpegs:
                try:
                    images = decode_jpeg(
                        [torch.frombuffer(bytearray(datas[k]), dtype=torch.uint8) for k in jpegs],
                        mode=ImageReadMode.RGB,
                        device=device,
                    )
                    decoded = dict(zip(jpegs, images))
                except RuntimeError:
                    decoded = {}  # nvjpeg refuses the whole list for one odd file (e.g. CMYK): CPU for this chunk
            rest = [k for k in range(len(indices)) if k not in decoded]
            for k, image in zip(rest, pool.map(lambda k: _decode_cpu(datas[k], paths[indices[k]]), rest)):
                decoded[k] = image.to(device, non_blocking=True)
            # Same-size images (most of a scanner's export) are resized in one batched call.
            by_size: dict[tuple[int, int], list[int]] = {}
            for k, image in decoded.items():
                by_size.setdefault(tuple(image.shape[-2:]), []).append(k)
            for ks in by_size.values():
                resized = _resize(torch.stack([decoded[k] for k in ks]), shape[-1])
                out[torch.tensor([indices[k] for k in ks], device=device)] = resized
            bar.update(len(indices))
    return out
