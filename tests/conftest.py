"""Shared fixtures: small generated data sets and an untrained tiny checkpoint (no downloads, CPU only)."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import torch

from helpers import make_checkpoint

# Nothing a test runs writes under the user's home: the caches and configs of braintumor, matplotlib and torch
# (hub, inductor) go to one folder for this session, removed at exit; subprocesses inherit it. The hash cache
# moves further, into each test's own tmp_path (private_cache below). Each pytest process (xdist's controller and
# each worker) has its own session folder, in the temporary folder the run started with: a worker inherits the
# controller's TMPDIR redirect below, and nesting there made paths too long for Chromium's socket (108 bytes).
_OUTER_TMPDIR = os.environ.setdefault("_BRAINTUMOR_TESTS_OUTER_TMPDIR", tempfile.gettempdir())
tempfile.tempdir = _OUTER_TMPDIR
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="braintumor-tests-"))
atexit.register(shutil.rmtree, _SESSION_HOME, ignore_errors=True)
for _variable, _folder in (("XDG_CACHE_HOME", "cache"), ("XDG_CONFIG_HOME", "config"), ("MPLCONFIGDIR", "matplotlib"),
                           ("TORCH_HOME", "torch"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
    os.environ[_variable] = str(_SESSION_HOME / _folder)
os.environ.pop("BRAINTUMOR_CACHE_DIR", None)
# Processes the tests start put their temporary files there too (torchrun leaves a torchelastic_* folder per run,
# volumes spool their planes), so that nothing outlives the session. This process keeps the outer temporary folder,
# where pytest's tmp_path lives.
(_SESSION_HOME / "tmp").mkdir()
os.environ["TMPDIR"] = str(_SESSION_HOME / "tmp")
# torch.compile's tests build a few tiny kernels: compiling them in this process is faster than starting
# inductor's pool of compile workers (2026-12-05, 2 cores: 22 s against 27 s for test_train_step's compiled step).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# inductor's precompiled headers (~0.9 GB) go to tempfile.gettempdir()/torchinductor_<user>/precompiled_headers,
# fixed when torch._inductor.codecache is imported, whatever TORCHINDUCTOR_CACHE_DIR says: import it with the
# session's temporary folder in place, so that they leave with the session instead of staying in /dev/shm or /tmp.
tempfile.tempdir = os.environ["TMPDIR"]
import torch._inductor.codecache  # noqa: E402,F401

tempfile.tempdir = _OUTER_TMPDIR

# Tests share 2 cores with other processes in CI: at most 2 intra-op threads, divided among pytest-xdist's workers
# (PYTEST_XDIST_WORKER_COUNT), so that workers, the DDP test and servers do not oversubscribe the cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


# The test files with the most work (worker-seconds of a whole run on 2 cores, 2026-12-04) run first. pytest-xdist's
# loadfile hands each worker one file, then the next file in collection order to whichever worker runs dry (with
# --no-loadscope-reorder, which `make test` passes; by default xdist orders the files by their number of tests, and
# the few long tests of test_distributed then ran last, on one worker, while the others idled). Longest first, the
# short files fill the workers at the end.
HEAVY_FIRST = ("test_bad_inputs.py", "test_train.py", "test_distributed.py", "test_cli.py", "test_crash_points.py",
               "test_train_step.py", "test_benchmarks.py", "test_backends.py", "test_cpu_backends.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: position for position, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order is kept


@pytest.fixture(scope="session", autouse=True)
def shipped_models_unchanged():
    """Nothing a test runs may rewrite a model shipped inside the package (issue 25: `calibrate reference` once did):
    the sha256 of src/braintumor/reference/*.pt at the start of the session must hold at its end."""
    import hashlib

    from braintumor.models.checkpoint import REFERENCE_MODEL

    def digests():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                for path in sorted(REFERENCE_MODEL.parent.glob("*.pt"))}

    before = digests()
    yield
    assert digests() == before, "a test rewrote a shipped model file under src/braintumor/reference/"


# The SIGSEGV that killed the whole suite in one process (2026-11-30; reproduced twice on 2026-12-04, at
# tests/test_distributed.py's first test, after ~230 earlier tests): a test that iterates a torch DataLoader with
# worker processes (here tests/test_benchmarks.py's time_to_accuracy run) makes torch install a Python SIGCHLD
# handler in this process (torch.utils.data._utils.signal_handling._set_SIGCHLD_handler) that is never removed.
# From then on every child that exits sends SIGCHLD to the pytest process, and CPython runs handlers on the main
# thread's alternate signal stack (SA_ONSTACK; faulthandler's 16,880-byte sigaltstack). Evidence: `strace -f -e
# trace=sigaltstack,rt_sigaction` shows rt_sigaction(SIGCHLD, <handler>, SA_ONSTACK) from the main thread in
# test_benchmarks, then at test_distributed "--- SIGCHLD {si_pid=<torchrun>, CLD_EXITED} ---" immediately followed
# by "--- SIGSEGV {si_code=SI_KERNEL, si_addr=NULL} ---" on the main thread: the kernel could not build the
# signal frame (no faulthandler dump: its handler needs the same stack). In the core (gdb), the main thread sits
# in poll() (subprocess.run of torchrun), no thread faults, and the sigaltstack's memory holds glibc free-chunk
# links (fd/bk into main_arena): the stack had been freed and reused while still installed. The fix: no test
# leaves a SIGCHLD handler behind, so child exits are never signals with a handler in this process.
_SIGCHLD_AT_START = signal.getsignal(signal.SIGCHLD)


@pytest.fixture(autouse=True)
def no_sigchld_handler_left_behind():
    """Restore SIGCHLD's disposition after each test (torch's DataLoader installs a handler; see above)."""
    yield
    if signal.getsignal(signal.SIGCHLD) is not _SIGCHLD_AT_START:
        signal.signal(signal.SIGCHLD, _SIGCHLD_AT_START)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test hashes into its own cache under tmp_path: returns the folder the hash cache will use."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("BRAINTUMOR_CACHE_DIR", raising=False)
    return tmp_path / "xdg" / "braintumor" / "audit"


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """A folder-per-class phantom set: 4 classes x 6 slices of 64 px."""
    from braintumor.synthetic.phantom import write_phantom_set

    return write_phantom_set(tmp_path_factory.mktemp("phantoms"), per_class=6, size=64, seed=123)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of an untrained resnet18 checkpoint at 64 px with the four phantom classes."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="session")
def trusted_checkpoint(tmp_path_factory, tiny_checkpoint, phantom_dir):
    """The tiny checkpoint with an OOD detector and temperature fitted on phantoms (train: phantom_dir,
    validation: 6 other phantoms per class). Untrained, but its features still tell phantoms from photos."""
    import shutil

    from braintumor.data.index import discover
    from braintumor.synthetic.phantom import write_phantom_set
    from braintumor.trust.fitting import fit_trust, store_trust

    root = tmp_path_factory.mktemp("trusted")
    path = shutil.copy(tiny_checkpoint, root / "trusted.pt")
    train, val = discover(phantom_dir), discover(write_phantom_set(root / "val", per_class=6, size=64, seed=321))
    store_trust(path, fit_trust(path, train.paths, train.labels, val.paths, val.labels))
    return path
