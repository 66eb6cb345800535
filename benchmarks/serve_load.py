"""Bounded load test of `braintumor serve`: N requests, C at a time, over loopback only.

Starts the real server (uvicorn, in a subprocess) on a free 127.0.0.1 port with a given checkpoint or a
random-init one, posts phantom PNG slices to /api/predict from C client threads, and prints the error count,
p50/p95 latency, throughput and the machine's core count. Exits 1 on any error or when the total time
limit is passed, so it doubles as a smoke test (tests/test_serve.py runs it in a small mode).

    python benchmarks/serve_load.py --arch resnet18 --image-size 224            # 200 requests, 8 concurrent
    python benchmarks/serve_load.py --checkpoint runs/demo/best.pt --explain-every 10
    python benchmarks/serve_load.py --concurrency 16 --hostile-every 4   # every 4th request: two memory bombs

Hostile mode (``--hostile-every k``) makes every k-th request a hostile one, in turn: the volume bombs of
tests/bombs.py (a gzipped NIfTI of 16384 x 16384 x 1 uint8, one of 512 x 512 x 1024 int16, a deflated multi-frame
DICOM of 1024 x 512²), a 16-bit 9000 px PNG and a deflated 9000 px DICOM slice. Meanwhile ``--junk-clients``
threads post requests of 16 random 19 MB files, and ``--slow-clients`` connections send their headers (and
a fifth of them their body) too slowly. Hostile and junk requests may be answered or refused (413/415/503),
but the normal requests must all succeed; the server's baseline, peak (VmHWM) and final resident memory are
printed, with how many slow clients the server closed.
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
    parser.add_argument("--bomb-side", type=int, default=9000, help="side of the 2-D memory-bomb images, pixels")
    parser.add_argument("--junk-clients", type=int, default=None,
                        help="threads posting 16 x 19 MB junk files meanwhile (default: 2 with --hostile-every)")
    parser.add_argument("--slow-clients", type=int, default=None,
                        help="slow-header connections opened meanwhile, plus a fifth as many slow-body ones "
                             "(default: 20 with --hostile-every)")
    parser.add_argument("--budget-mb", type=int, default=None, help="server's memory budget (default: its own)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    hostile = bool(args.hostile_every)
    args.junk_clients = (2 if hostile else 0) if args.junk_clients is None else args.junk_clients
    args.slow_clients = (20 if hostile else 0) if args.slow_clients is None else args.slow_clients
    return args


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def start_server(checkpoint: Path, port: int, threads: int | None, device: str, log,
                 budget_mb: int | None = None) -> subprocess.Popen:
    code = ("import sys; from braintumor.serve import run_server; "
            "run_server(sys.argv[1], host=sys.argv[2], port=int(sys.argv[3]), "
            "workers_threads=int(sys.argv[4]) or None, device=sys.argv[5], budget_mb=int(sys.argv[6]) or None)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", code, str(checkpoint), HOST, str(port), str(threads or 0), device,
                             str(budget_mb or 0)], stdout=log, stderr=subprocess.STDOUT, env=env)


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


def hostile_requests(side: int) -> list[tuple[str, list[tuple[str, bytes]]]]:
    """(kind, files) of each hostile request, made with tests/bombs.py (nothing hostile ships in the repository)."""
    sys.path.insert(0, str(REPO / "tests"))
    from bombs import dicom_deflate_bomb, multiframe_dicom_deflate_bomb, nifti_bomb, png16_bomb

    return [("nifti 16384x16384x1 uint8", [("wide.nii.gz", nifti_bomb((16384, 16384, 1), "uint8"))]),
            ("nifti 512x512x1024 int16", [("deep.nii.gz", nifti_bomb((512, 512, 1024), "int16"))]),
            ("deflate dicom 1024x512x512", [("frames.dcm", multiframe_dicom_deflate_bomb(1024, 512))]),
            (f"png16 + deflate dicom {side}px", [("bomb16.png", png16_bomb(side)), ("bomb.dcm", dicom_deflate_bomb(side))])]


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


class MemoryMonitor(threading.Thread):
    """Samples the server's resident memory every 0.2 s (the peak it reports is VmHWM, the kernel's own)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.samples.append(server_memory_mib(self.pid).get("VmRSS", 0.0))


def junk_uploads(base: str, stop: threading.Event, outcomes: list[str], lock: threading.Lock) -> None:
    """Post requests of 16 random 19 MB files until ``stop``; record each outcome."""
    import httpx

    junk = np.random.default_rng(0).integers(0, 256, 19 * 2**20, dtype=np.uint8).tobytes()
    with httpx.Client() as client:
        while not stop.is_set():
            try:
                response = client.post(f"{base}/api/predict", timeout=120,
                                       files=[("files", (f"junk{i}.png", junk, "image/png")) for i in range(16)])
                outcome = f"HTTP {response.status_code}"
            except httpx.HTTPError as err:
                outcome = type(err).__name__
            with lock:
                outcomes.append(outcome)


def slow_client(port: int, body: bool, limit: float, results: list[float | None], lock: threading.Lock) -> None:
    """One connection that sends its headers (or, with ``body``, its body) a byte every 2 s; records the seconds
    until the server closed it (None: still open after ``limit``)."""
    start = time.monotonic()
    closed = None
    try:
        with socket.create_connection((HOST, port), timeout=5) as sock:
            if body:
                sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                             b"boundary=B\r\nContent-Length: 1000000\r\n\r\n")
                drip = b"--B\r\n" + b"x" * 1000
            else:
                drip = b"POST /api/predict HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"x" * 1000
            sock.settimeout(2.0)
            for byte in drip:
                if time.monotonic() - start > limit:
                    break
                try:
                    sock.sendall(bytes([byte]))
                    if sock.recv(4096) == b"":
                        closed = time.monotonic() - start
                        break
                except socket.timeout:
                    continue
                except OSError:
                    closed = time.monotonic() - start
                    break
    except OSError:
        closed = time.monotonic() - start
    with lock:
        results.append(closed)


def run_load(base: str, args, deadline: float) -> tuple[list[float], list[str], float]:
    """Send the requests; returns per-request latencies (s) of successes, error strings and wall time.

    Hostile requests (``--hostile-every``) are not counted there: their outcomes go to ``args.hostile_results``.
    """
    import httpx

    slices = phantom_pngs(args.slice_size)
    hostile = hostile_requests(args.bomb_side) if args.hostile_every else []
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
        if hostile and index % args.hostile_every == args.hostile_every - 1:
            kind, files = hostile[(index // args.hostile_every) % len(hostile)]
            start = time.perf_counter()
            try:
                response = local.client.post(url, files=[("files", (n, d, "application/octet-stream"))
                                                         for n, d in files], timeout=remaining)
                outcome = f"HTTP {response.status_code}"
            except httpx.HTTPError as err:
                outcome = f"{type(err).__name__}"
            with lock:
                args.hostile_results.append((kind, outcome, time.perf_counter() - start))
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
                args.last_normal = max(args.last_normal, time.perf_counter())

    stop = threading.Event()
    args.junk_results, args.slow_results = [], []
    port = int(base.rsplit(":", 1)[1])
    helpers = [threading.Thread(target=junk_uploads, args=(base, stop, args.junk_results, lock), daemon=True)
               for _ in range(args.junk_clients)]
    helpers += [threading.Thread(target=slow_client, args=(port, k % 5 == 4, 60.0, args.slow_results, lock),
                                 daemon=True) for k in range(args.slow_clients + args.slow_clients // 5)]
    for thread in helpers:
        thread.start()
    start = args.last_normal = time.perf_counter()
    args.started = start
    try:
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, range(args.requests)))
    finally:
        stop.set()
        for thread in helpers:
            thread.join(timeout=max(1.0, deadline - time.monotonic()))
    return latencies, errors, time.perf_counter() - start


def warm_up(base: str, count: int = 6) -> None:
    """A few ordinary requests, so that the baseline includes what every request allocates once."""
    import httpx

    with httpx.Client() as client:
        for name, data in phantom_pngs(256, count):
            client.post(f"{base}/api/predict?preview=1", files=[("files", (name, data, "image/png"))], timeout=120)


def settle(pid: int, baseline: float, seconds: float = 20.0) -> float:
    """The server's RSS once it has come back to within 10 % of ``baseline`` or after ``seconds``, MiB."""
    end = time.monotonic() + seconds
    rss = server_memory_mib(pid).get("VmRSS", 0.0)
    while rss > 1.1 * baseline and time.monotonic() < end:
        time.sleep(0.5)
        rss = server_memory_mib(pid).get("VmRSS", 0.0)
    return rss


def main(argv=None) -> int:
    args = parse_args(argv)
    import httpx

    from braintumor.models.checkpoint import random_checkpoint

    deadline = time.monotonic() + args.timeout
    with tempfile.TemporaryDirectory(prefix="braintumor_load_") as folder:
        folder = Path(folder)
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint(
            folder / f"{args.arch}_{args.image_size}.pt", arch=args.arch, image_size=args.image_size)
        port = free_port()
        base = f"http://{HOST}:{port}"
        log_path = folder / "server.log"
        with open(log_path, "wb") as log:
            server = start_server(checkpoint, port, args.server_threads, args.device, log, args.budget_mb)
            try:
                with httpx.Client() as client:
                    model = wait_until_up(client, base, server, deadline)
                warm_up(base)
                baseline = server_memory_mib(server.pid).get("VmRSS", 0.0)
                monitor = MemoryMonitor(server.pid)
                monitor.start()
                latencies, errors, wall = run_load(base, args, deadline)
                monitor.stop.set()
                after = settle(server.pid, baseline)
                memory = server_memory_mib(server.pid)
                with httpx.Client() as client:
                    budget = client.get(f"{base}/api/model", timeout=10).json()["limits"].get("budget_bytes")
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
            server_log = log_path.read_text(errors="replace")

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
    normal_span = max(1e-9, args.last_normal - args.started)
    print(f"throughput: {len(latencies) / normal_span:.2f} normal requests/s (the last answered after "
          f"{normal_span:.1f} s; the whole run took {wall:.1f} s)")
    if memory:
        sampled = max(monitor.samples, default=0.0)
        print(f"server memory: baseline RSS {baseline:.0f} MiB, peak RSS {memory.get('VmHWM', 0):.0f} MiB "
              f"(sampled peak {sampled:.0f} MiB), RSS after the run {after:.0f} MiB "
              f"({after - baseline:+.0f} MiB); budget {budget / 2**20:.0f} MiB" if budget else "")
    if args.hostile_every:
        from collections import Counter, defaultdict

        by_kind: dict[str, Counter] = defaultdict(Counter)
        slowest: dict[str, float] = defaultdict(float)
        for kind, outcome, seconds in args.hostile_results:
            by_kind[kind][outcome] += 1
            slowest[kind] = max(slowest[kind], seconds)
        print(f"hostile requests: {len(args.hostile_results)}")
        for kind, outcomes in by_kind.items():
            print(f"  {kind}: {dict(outcomes)}, slowest {slowest[kind]:.1f} s")
    if args.junk_clients:
        from collections import Counter

        print(f"junk uploads (16 x 19 MB, {args.junk_clients} clients): {len(args.junk_results)}, "
              f"outcomes {dict(Counter(args.junk_results))}")
    if args.slow_results:
        closed = [seconds for seconds in args.slow_results if seconds is not None]
        print(f"slow clients: {len(closed)} of {len(args.slow_results)} closed by the server"
              + (f" (after {min(closed):.0f}-{max(closed):.0f} s)" if closed else ""))
    if "Traceback" in server_log:
        print("server log has a traceback:\n" + server_log[server_log.index("Traceback"):][:3000])
    for problem in errors[:10]:
        print(f"  {problem}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
