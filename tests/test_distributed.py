"""DDP with torchrun: 2 CPU processes (gloo) through the real CLI, compared with one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from braintumor.models.checkpoint import load_checkpoint

WORKER = Path(__file__).with_name("ddp_worker.py")  # parses the CLI, injects the model factory, dumps weights


@pytest.fixture(scope="module")
def symmetric_data(phantom_dir, tmp_path_factory):
    """Left-right symmetric phantoms: a random flip leaves them unchanged, so any shard sees the same inputs."""
    root = tmp_path_factory.mktemp("symmetric")
    for path in sorted(phantom_dir.rglob("*.png")):
        pixels = np.asarray(Image.open(path), dtype=np.float32)
        out = root / path.parent.name / path.name
        out.parent.mkdir(exist_ok=True)
        Image.fromarray(((pixels + pixels[:, ::-1]) / 2).round().astype(np.uint8)).save(out)
    return root


def run_worker(tmp_path, name, args, nproc=None, mode="batch-norm", expect_success=True):
    dump = tmp_path / f"{name}-weights"
    dump.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = [sys.executable]
    if nproc:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    result = subprocess.run([*launcher, str(WORKER), str(dump), mode, *args], capture_output=True, text=True,
                            env=env, timeout=300)
    if expect_success:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return dump, result.stderr if expect_success else result  # the log: progress lines go to stderr


def train_args(data, out, **extra):
    args = ["train", str(data), "--arch", "resnet18", "--weights", "none", "--epochs", "1", "--lr", "1e-3",
            "--image-size", "32", "--batch-size", "8", "--rotation", "0", "--device", "cpu", "--workers", "0",
            "--seed", "3", "--no-progress", "--out", str(out)]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ranks_end_identical_and_resume_works_with_another_world_size(symmetric_data, tmp_path):
    dump, log = run_worker(tmp_path, "ddp", train_args(symmetric_data, tmp_path / "run"), nproc=2)
    rank0 = torch.load(dump / "rank0.pt", weights_only=True)
    rank1 = torch.load(dump / "rank1.pt", weights_only=True)
    for key in rank0:  # parameters via gradient all-reduce, BatchNorm statistics via buffer averaging
        assert torch.equal(rank0[key], rank1[key]), f"ranks disagree on {key}"
    # Only rank 0 wrote: one log line, one metrics row; both shards' images counted (2 global batches of 8).
    assert log.count("epoch 1/1") == 1
    assert [(r["epoch"], r["train_images"]) for r in rows(tmp_path / "run")] == [(1, 16)]
    assert torch.equal(load_checkpoint(tmp_path / "run" / "last.pt")["model"]["fc.3.weight"], rank0["fc.3.weight"])

    run_worker(tmp_path, "resumed", ["train", "--resume", str(tmp_path / "run"), "--epochs", "2"])
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2
    assert [r["epoch"] for r in rows(tmp_path / "run")] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("data_cache", ["none", "memory"])
def test_two_processes_match_one_process_on_the_same_global_batch(symmetric_data, tmp_path, data_cache):
    settings = dict(data_cache=data_cache, epochs=2)
    ddp, _ = run_worker(tmp_path, "ddp", train_args(symmetric_data, tmp_path / "ddp", **settings), nproc=2,
                        mode="group-norm")
    single, _ = run_worker(tmp_path, "single", train_args(symmetric_data, tmp_path / "single", **settings),
                           mode="group-norm")
    ddp_weights = torch.load(ddp / "rank0.pt", weights_only=True)
    single_weights = torch.load(single / "rank0.pt", weights_only=True)
    worst = max((ddp_weights[k] - single_weights[k]).abs().max().item() for k in single_weights)
    assert worst < 2e-5, worst  # 4 Ranger steps of lr 1e-3 move weights by ~1e-3: a wrong shard would show
    for a, b in zip(rows(tmp_path / "ddp"), rows(tmp_path / "single")):
        assert a["train_images"] == b["train_images"] == 16
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
        assert a["val_accuracy"] == b["val_accuracy"]


@pytest.mark.slow
def test_a_user_error_on_rank_0_stops_every_rank(symmetric_data, tmp_path):
    """Rank 0 checks the files; its error must reach rank 1 too instead of leaving it waiting forever."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(symmetric_data, data)
    (data / "glioma" / "broken.png").write_bytes(b"not a png")
    _, result = run_worker(tmp_path, "ddp", train_args(data, tmp_path / "run"), nproc=2, mode="cli",
                           expect_success=False)
    assert result.returncode != 0
    assert result.stderr.count("error: 1 unreadable image(s) in") == 2  # printed by both ranks, then both exit
    assert not (tmp_path / "run" / "last.pt").exists()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_nodes(tmp_path, name, args, mode="group-norm"):
    """Two torchrun agents as two nodes of one process each, meeting by c10d rendezvous on 127.0.0.1 (gloo)."""
    dump = tmp_path / f"{name}-weights"
    dump.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for node_rank in (0, 1):
        # Node 0 hosts the rendezvous store; node 1 only connects to it (is_host says so explicitly, since both
        # "machines" share the address).
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
                   "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                   "--rdzv-id", f"{name}-{os.getpid()}", "--rdzv-conf", f"is_host={node_rank == 0}",
                   "--local-addr", "127.0.0.1", str(WORKER), str(dump), mode, *args]
        nodes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return dump, "".join(stderr for _, stderr in outputs)  # the nodes' logs (stderr)


@pytest.mark.slow
def test_two_nodes_match_one_process_on_the_same_global_batch(symmetric_data, tmp_path):
    """Multi-node: the same c10d rendezvous and gloo all-reduce a cluster uses, with both nodes on loopback."""
    settings = dict(data_cache="memory", epochs=2)
    nodes, log = run_two_nodes(tmp_path, "nodes", train_args(symmetric_data, tmp_path / "nodes", **settings))
    single, _ = run_worker(tmp_path, "single", train_args(symmetric_data, tmp_path / "single", **settings),
                           mode="group-norm")
    assert log.count("epoch 2/2") == 1  # one rank 0 over both nodes writes and prints
    rank0 = torch.load(nodes / "rank0.pt", weights_only=True)
    rank1 = torch.load(nodes / "rank1.pt", weights_only=True)
    single_weights = torch.load(single / "rank0.pt", weights_only=True)
    for key in single_weights:
        assert torch.equal(rank0[key], rank1[key]), f"nodes disagree on {key}"
    worst = max((rank0[k] - single_weights[k]).abs().max().item() for k in single_weights)
    assert worst < 2e-5, worst
    for a, b in zip(rows(tmp_path / "nodes"), rows(tmp_path / "single")):
        assert a["train_images"] == b["train_images"] == 16
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
        assert a["val_accuracy"] == b["val_accuracy"]
