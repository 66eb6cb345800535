"""Bounded load test of `braintumor serve`: N requests, C at a time, over loopback only.

Starts the real server (uvicorn, in a subprocess) on a free 127.0.0.1 port with a given checkpoint or a
random-init one, posts phantom PNG slices to /api/predict from C client threads, and prints the error count,
p50/p95 latency, throughput and the machine's core count. Exits 1 on any error or when the total time
limit is passed, so it doubles as a smoke test (tests/test_serve.py runs it in a small mode).

    python benchmarks/serve_load.py --arch resnet18 --image-size 224            # 200 requests, 8 concurrent
    python benchmarks/serve_load.py --checkpoint runs/demo/best.pt --explain-every 10
    python benchmarks/serve_load.py --concurrency 16 --hostile-every 4   # every 4th request: two memory bombs

Hostile mode interleaves requests carrying two small files that decode to huge images (a 16-bit 9000 px PNG of
about 160 KB and a deflated 16-bit 9000 px DICOM of about 180 KB): they may be answered or refused, but must not
fail the normal requests; the server's peak resident memory (VmHWM) and its memory afterwards are printed, and
the normal requests' latencies are reported on their own.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # loopback only, whatever the arguments


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint to serve (default: a random-init model of --arch)")
    parser.add_argument("--arch", default="resnet18", help="architecture of the random-init model")
    parser.add_argument("--image-size", type=int, default=224, help="input size of the random-init model")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--slice-size", type=int, default=256, help="side of the uploaded phantom PNGs")
    parser.add_argument("--explain-every", type=int, default=0,
                        help="ask for Grad-CAM on every k-th request (0: never)")
    parser.add_argument("--server-threads", type=int, default=None, help="server's inference threads")
    parser.add_argument("--device", default="cpu", help="server's device: cpu, cuda or auto")
    parser.add_argument("--timeout", type=float, default=600.0, help="limit on the whole run, seconds")
    parser.add_argument("--hostile-every", type=int, default=0,
                        help="every k-th request uploads two memory-bomb files instead of a slice (0: never)")
    parser.add_argument("--bomb-side", type=int, default=9000, help="side of the memory-bomb images, pixels")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    return args


def random_checkpoint(arch: str, image_size: int, folder: Path) -> Path:
    """An untrained (seeded) checkpoint with the four phantom classes."""
    import torch

    from braintumor.models.checkpoint import ModelSpec, inference_payload, save_checkpoint
    from braintumor.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from braintumor.models.network import build_model
    from braintumor.synthetic.phantom import PHANTOM_CLASSES

    torch.manual_seed(0)
    model = build_model(arch, num_classes=len(PHANTOM_CLASSES), weights="none").eval()
    path = folder / f"{arch}_{image_size}.pt"
    spec = ModelSpec(arch=arch, classes=PHANTOM_CLASSES, image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    save_checkpoint(inference_payload(model.state_dict(), spec, config={}, epoch=0, best_val_accuracy=0.0), path)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def start_server(checkpoint: Path, port: int, threads: int | None, device: str, log) -> subprocess.Popen:
    code = ("import sys; from braintumor.serve import run_server; "
            "run_server(sys.argv[1], host=sys.argv[2], port=int(sys.argv[3]), "
            "workers_threads=int(sys.argv[4]) or None, device=sys.argv[5])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", code, str(checkpoint), HOST, str(port), str(threads or 0), device],
                            stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_until_up(client, base: str, server: subprocess.Popen, deadline: float) -> dict:
    import httpx

    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} before answering")
        try:
            return client.get(f"{base}/api/model", timeout=2.0).json()
        except httpx.TransportError:
            time.sleep(0.2)
    raise TimeoutError("the server did not answer /api/model in time")


def phantom_pngs(size: int, count: int = 8) -> list[tuple[str, bytes]]:
    from PIL import Image

    from braintumor.synthetic.phantom import PHANTOM_CLASSES, make_phantom

    slices = []
    for i in range(count):
        label = PHANTOM_CLASSES[i % len(PHANTOM_CLASSES)]
        buffer = io.BytesIO()
        Image.fromarray(make_phantom(label, size, i)).save(buffer, format="PNG")
        slices.append((f"{label}_{i}.png", buffer.getvalue()))
    return slices


def bomb_files(side: int) -> list[tuple[str, bytes]]:
    from bombs import dicom_deflate_bomb, png16_bomb

    return [("bomb16.png", png16_bomb(side)), ("bomb.dcm", dicom_deflate_bomb(side))]


def server_memory_mib(pid: int) -> dict[str, float]:
    """Peak (VmHWM) and current (VmRSS) resident memory of a process, MiB (Linux)."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return values


def run_load(base: str, args, deadline: float) -> tuple[list[float], list[str], float]:
    """Send the requests; returns per-request latencies (s) of successes, error strings and wall time.

    Hostile requests (``--hostile-every``) are not counted there: their outcomes go to ``args.hostile_results``.
    """
    import httpx

    slices = phantom_pngs(args.slice_size)
    bombs = bomb_files(args.bomb_side) if args.hostile_every else []
    args.hostile_results = []
    local = threading.local()
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            with lock:
                errors.append(f"request {index}: not sent, total time limit reached")
            return
        if not hasattr(local, "client"):
            local.client = httpx.Client()
        name, data = slices[index % len(slices)]
        explain = args.explain_every and index % args.explain_every == 0
        url = f"{base}/api/predict" + ("?explain=1" if explain else "")
        if bombs and index % args.hostile_every == args.hostile_every - 1:
            start = time.perf_counter()
            try:
                response = local.client.post(url, files=[("files", (n, d, "application/octet-stream"))
                                                         for n, d in bombs], timeout=remaining)
                outcome = f"HTTP {response.status_code}"
            except httpx.HTTPError as err:
                outcome = f"{type(err).__name__}"
            with lock:
                args.hostile_results.append((outcome, time.perf_counter() - start))
            return
        start = time.perf_counter()
        try:
            response = local.client.post(url, files=[("files", (name, data, "image/png"))], timeout=remaining)
            elapsed = time.perf_counter() - start
            ok = response.status_code == 200 and len(response.json()["results"]) == 1
            problem = None if ok else f"request {index}: HTTP {response.status_code} {response.text[:200]}"
        except (httpx.HTTPError, ValueError, KeyError) as err:
            elapsed, problem = time.perf_counter() - start, f"request {index}: {type(err).__name__}: {err}"
        with lock:
            if problem:
                errors.append(problem)
            else:
                latencies.append(elapsed)

    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(one, range(args.requests)))
    return latencies, errors, time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    import httpx

    deadline = time.monotonic() + args.timeout
    with tempfile.TemporaryDirectory(prefix="braintumor_load_") as folder:
        folder = Path(folder)
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint(args.arch, args.image_size, folder)
        port = free_port()
        base = f"http://{HOST}:{port}"
        log_path = folder / "server.log"
        with open(log_path, "wb") as log:
            server = start_server(checkpoint, port, args.server_threads, args.device, log)
            try:
                with httpx.Client() as client:
                    model = wait_until_up(client, base, server, deadline)
                latencies, errors, wall = run_load(base, args, deadline)
                time.sleep(1.0)  # let the server finish any request the client gave up on
                memory = server_memory_mib(server.pid)
            except (RuntimeError, TimeoutError) as err:
                print(f"error: {err}\n--- server log ---\n{log_path.read_text(errors='replace')[-4000:]}")
                return 1
            finally:
                server.terminate()
                try:
                    server.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()

    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    source = args.checkpoint or "random init"
    print(f"serve load test: {args.requests} requests, {args.concurrency} concurrent, loopback {HOST}")
    print(f"model: {model['arch']} at {model['image_size']} px ({source}, {model['backend']} on {args.device}), "
          f"slices {args.slice_size} px PNG, explain every {args.explain_every or 'never'}")
    print(f"cores: {cores} (usable by this process: {usable})")
    print(f"errors: {len(errors)}")
    if latencies:
        p50, p95 = np.percentile(np.array(latencies) * 1000, [50, 95])
        print(f"latency: p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {max(latencies) * 1000:.1f} ms")
    print(f"throughput: {len(latencies) / wall:.2f} requests/s over {wall:.1f} s")
    if memory:
        print(f"server memory: peak RSS {memory.get('VmHWM', 0):.0f} MiB, RSS after the run "
              f"{memory.get('VmRSS', 0):.0f} MiB")
    if args.hostile_every:
        from collections import Counter

        outcomes = Counter(outcome for outcome, _ in args.hostile_results)
        slowest = max((seconds for _, seconds in args.hostile_results), default=0.0)
        print(f"hostile requests (2 bomb files of {args.bomb_side} px each): {len(args.hostile_results)}, "
              f"outcomes {dict(outcomes)}, slowest {slowest:.1f} s")
    for problem in errors[:10]:
        print(f"  {problem}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
