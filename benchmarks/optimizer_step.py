"""Time one optimizer step over a ResNet's parameters: braintumor's Ranger vs torch.optim.RAdam(foreach=True).

Every optimizer gets its own copy of the parameters with the same fixed random gradients. After ``--warmup``
steps (so the RAdam rectification is active, the slowest branch), each repeat times ``k`` consecutive steps --
one full LookAhead cycle, so the synchronisation step is paid for -- and reports the time per step; the table
shows the median over repeats and the ratio to RAdam. Prints a markdown table; asserts nothing.

    python benchmarks/optimizer_step.py --device auto --arch resnet152 --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from typing import Callable

import torch
import torchvision

from braintumor.optim import Ranger


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _make_params(arch: str, device: torch.device, seed: int) -> list[torch.nn.Parameter]:
    model = getattr(torchvision.models, arch)(weights=None)
    generator = torch.Generator().manual_seed(seed)
    params = []
    for param in model.parameters():
        param = torch.nn.Parameter(param.detach().to(device))
        param.grad = (torch.randn(param.shape, generator=generator) * 1e-2).to(device)
        params.append(param)
    return params


def _time_optimizer(
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    params: list[torch.nn.Parameter],
    *,
    warmup: int,
    repeats: int,
    steps_per_repeat: int,
    device: torch.device,
) -> float:
    """Median seconds per step over ``repeats`` blocks of ``steps_per_repeat`` steps."""
    optimizer = make(params)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        optimizer.step()
    synchronize()
    per_step = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps_per_repeat):
            optimizer.step()
        synchronize()
        per_step.append((time.perf_counter() - start) / steps_per_repeat)
    del optimizer
    return statistics.median(per_step)


def main(argv: list[str] | None = None) -> None:
    """Parse flags, time each optimizer, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--arch", default="resnet152", help="torchvision model whose parameters are stepped")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks of k steps each (median reported)")
    parser.add_argument("--warmup", type=int, default=6, help="untimed steps first (6: rectification active)")
    parser.add_argument("--k", type=int, default=6, help="LookAhead period; also the steps per timed block")
    args = parser.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    lr, betas, eps, weight_decay = 1e-3, (0.95, 0.999), 1e-5, 1e-4
    candidates: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
        "torch.optim.RAdam(foreach=True)": lambda p: torch.optim.RAdam(
            p, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=True, foreach=True
        ),
        "Ranger(foreach=True)": lambda p: Ranger(
            p, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, k=args.k, foreach=True
        ),
        "Ranger(foreach=False)": lambda p: Ranger(
            p, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, k=args.k, foreach=False
        ),
    }
    seconds = {}
    n_params = 0
    for name, make in candidates.items():
        params = _make_params(args.arch, device, seed=0)
        n_params = sum(param.numel() for param in params)
        seconds[name] = _time_optimizer(
            make, params, warmup=args.warmup, repeats=args.repeats, steps_per_repeat=args.k, device=device
        )
        del params
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    baseline = seconds["torch.optim.RAdam(foreach=True)"]
    print(
        f"One optimizer step over {args.arch} ({n_params / 1e6:.1f} M parameters) on {_device_name(device)}, "
        f"torch {torch.__version__}; median of {args.repeats} blocks of {args.k} steps after {args.warmup} warm-up "
        f"steps.\n"
    )
    print("| optimizer | ms / step | ratio to RAdam |")
    print("|---|---:|---:|")
    for name, value in seconds.items():
        print(f"| {name} | {value * 1e3:.1f} | {value / baseline:.2f} |")


if __name__ == "__main__":
    main()
