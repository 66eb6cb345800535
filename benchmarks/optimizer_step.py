"""Time one optimizer step over a ResNet's parameters: braintumor's Ranger vs torch.optim.RAdam(foreach=True).

Rows: RAdam foreach (the baseline), RAdam fused where this torch has a fused RAdam, Adam fused on CUDA (the floor
of a fused kernel of the same shape), and Ranger foreach, per tensor and compiled (``CompiledRanger``, on CUDA
or with ``--compiled`` on the CPU, where compiling takes a minute); the compiled row's compile time is printed.

Every optimizer gets its own copy of the parameters with the same fixed random gradients. After ``--warmup``
steps (so RAdam's rectification is active, its slowest branch), each repeat times ``k`` consecutive steps -- one
full LookAhead cycle, so the synchronisation step is paid for -- and divides by k. The optimizers take turns
repeat by repeat, so a change in machine load hits all of them alike. The table shows the median over repeats
(wall clock, and on CPU also the process CPU time) and the ratio to RAdam. Asserts nothing.

    python benchmarks/optimizer_step.py --device auto --arch resnet152 --repeats 5
"""

from __future__ import annotations

import argparse
import inspect
import platform
import statistics
import time
from typing import Callable

import torch
import torchvision

from braintumor.optim import Ranger
from braintumor.optim.ranger_compiled import CompiledRanger

BASELINE = "torch.optim.RAdam(foreach=True)"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _make_params(arch: str, device: torch.device, seed: int) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None)
    generator = torch.Generator().manual_seed(seed)
    params = []
    for param in model.parameters():
        param = torch.nn.Parameter(param.detach().to(device))
        param.grad = (torch.randn(param.shape, generator=generator) * 1e-2).to(device)
        params.append(param)
    return params


def main(argv: list[str] | None = None) -> None:
    """Parse flags, time each optimizer in turn, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--arch", default="resnet152", help="torchvision model whose parameters are stepped")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks of k steps each (median reported)")
    parser.add_argument("--warmup", type=int, default=6, help="untimed steps first (6: rectification active)")
    parser.add_argument("--k", type=int, default=6, help="LookAhead period; also the steps per timed block")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--gc", choices=("all", "conv", "none"), default="all", help="Ranger's gradient centralization")
    parser.add_argument("--compiled", action="store_true", help="also time CompiledRanger on the CPU (always on CUDA)")
    args = parser.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lr, betas, eps, weight_decay = 1e-3, (0.95, 0.999), 1e-5, 1e-4
    factories: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
        BASELINE: lambda p: torch.optim.RAdam(
            p, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=True, foreach=True
        ),
        "Ranger(foreach=True)": lambda p: Ranger(
            p, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, k=args.k, gc=args.gc, foreach=True
        ),
        "Ranger(foreach=False)": lambda p: Ranger(
            p, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, k=args.k, gc=args.gc, foreach=False
        ),
    }
    if "fused" in inspect.signature(torch.optim.RAdam).parameters:
        factories["torch.optim.RAdam(fused=True)"] = lambda p: torch.optim.RAdam(
            p, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=True, fused=True
        )
    if device.type == "cuda":
        factories["torch.optim.Adam(fused=True)"] = lambda p: torch.optim.Adam(
            p, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True
        )
    if device.type == "cuda" or args.compiled:
        factories["CompiledRanger"] = lambda p: CompiledRanger(
            p, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, k=args.k, gc=args.gc
        )
    optimizers = {}
    n_params = 0
    for name, make in factories.items():
        params = _make_params(args.arch, device, seed=0)
        n_params = sum(param.numel() for param in params)
        optimizers[name] = make(params)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    warmup_seconds = {}
    for name, optimizer in optimizers.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            optimizer.step()
        synchronize()
        warmup_seconds[name] = time.perf_counter() - start
    wall: dict[str, list[float]] = {name: [] for name in optimizers}
    cpu: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.repeats):
        for name, optimizer in optimizers.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(args.k):
                optimizer.step()
            synchronize()
            wall[name].append((time.perf_counter() - wall_start) / args.k)
            cpu[name].append((time.process_time() - cpu_start) / args.k)

    median_wall = {name: statistics.median(values) for name, values in wall.items()}
    median_cpu = {name: statistics.median(values) for name, values in cpu.items()}
    print(
        f"One optimizer step over {args.arch} ({n_params / 1e6:.1f} M parameters) on {_device_name(device)}, "
        f"torch {torch.__version__}; Ranger gc={args.gc!r}; median of {args.repeats} blocks of {args.k} steps "
        f"after {args.warmup} warm-up steps.\n"
    )
    if "torch.optim.RAdam(fused=True)" not in optimizers:
        print(f"torch {torch.__version__} has no fused RAdam; Adam(fused=True) is shown on CUDA as the fused floor.\n")
    if "CompiledRanger" in optimizers:
        print(f"CompiledRanger: {warmup_seconds['CompiledRanger']:.1f} s for its {args.warmup} warm-up steps, "
              f"compilation included.\n")
    if device.type == "cpu":
        print("| optimizer | wall ms / step | ratio to RAdam | CPU ms / step | ratio to RAdam |")
        print("|---|---:|---:|---:|---:|")
        for name in optimizers:
            print(
                f"| {name} | {median_wall[name] * 1e3:.1f} | {median_wall[name] / median_wall[BASELINE]:.2f} "
                f"| {median_cpu[name] * 1e3:.1f} | {median_cpu[name] / median_cpu[BASELINE]:.2f} |"
            )
    else:
        print("| optimizer | ms / step | ratio to RAdam |")
        print("|---|---:|---:|")
        for name in optimizers:
            print(f"| {name} | {median_wall[name] * 1e3:.2f} | {median_wall[name] / median_wall[BASELINE]:.2f} |")


if __name__ == "__main__":
    main()
