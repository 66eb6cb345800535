"""Training throughput: reference-style loop vs the project's train path vs the compute ceiling.

(a) reference: fp32, PIL DataLoader with CPU transforms, batch 32 (the notebook recipe);
(b) project: ``braintumor.training.trainer.train`` end to end on the folder (bad-file check, grouped split, decode cache,
    device augmentation, bf16, checkpoints, report), images/s of its last epoch and total wall time;
(c) ceiling: the same model, dtype, batch and optimizer on synthetic tensors already on the device;
(d) step variants on the same synthetic tensors (``--variants``): each ``--train-step`` mode of
    braintumor.training.step, and a doubled batch (lr doubled with it, the linear scaling rule), each with its
    warm-up time (first steps: compilation, CUDA-graph capture, cuDNN autotuning) and its steady rate.

On a machine without CUDA it runs in a small CPU mode (resnet18, 64 px) so that it stays usable; there only the
eager variants run unless ``--variants`` names compiled ones (compiling takes about a minute per variant).
Prints markdown tables; ``--json FILE`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.flop_counter import FlopCounterMode

from braintumor.training.config import TrainConfig
from braintumor.data.index import discover
from braintumor.data.pipeline import ImageFolderDataset
from braintumor.data.transforms import train_transform
from braintumor.models.network import build_model
from braintumor.optim import Ranger
from braintumor.training.trainer import make_optimizer, train
from braintumor.errors import UserError
from braintumor.utils.jsonfiles import write_json
from braintumor.utils.outputs import refuse_overwrites
from braintumor.training.step import (AUTO_COMPILE_MIN_STEPS, STEP_MODES, autocast, choose_precision, choose_step_mode,
                                  wrap_network)

# name -> (--train-step mode, batch multiplier, channels_last, --precision); the lr is multiplied with the batch
# (linear scaling rule). The Trainer uses channels_last on every device; "eager-contiguous" measures what that
# buys, and "eager-bf16" what --precision bf16 buys on a CPU (it is the default on CUDA).
VARIANTS = {"eager": ("eager", 1, True, "auto"), "eager-contiguous": ("eager", 1, False, "auto"),
            "eager-bf16": ("eager", 1, True, "bf16"), "compile": ("compile", 1, True, "auto"),
            "compile-step": ("compile-step", 1, True, "auto"), "cuda-graphs": ("cuda-graphs", 1, True, "auto"),
            "eager-2x-batch": ("eager", 2, True, "auto"), "compile-step-2x-batch": ("compile-step", 2, True, "auto")}
CPU_VARIANTS = ("eager", "eager-contiguous", "eager-bf16", "eager-2x-batch")
WARMUP_STEPS = 5

# Dense bf16 tensor-core peak (TFLOP/s) by device name, for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "RTX 4090": 165.0}


def device_peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_flops_per_image(arch: str, classes: int, image_size: int, device: torch.device) -> float:
    """Forward + backward FLOPs of one image, counted by torch.utils.flop_counter."""
    model = build_model(arch, classes, "none").to(device)
    images = torch.randn(2, 3, image_size, image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    return counter.get_total_flops() / 2


def reference_loop(paths, labels, cfg: TrainConfig, device: torch.device, steps: int, workers: int) -> float:
    """Images/s of the notebook-style loop: fp32, PIL decode + CPU transforms in workers, batch 32."""
    dataset = ImageFolderDataset(paths, labels, train_transform(cfg.image_size, cfg.rotation))
    sampler = RandomSampler(dataset, replacement=True, num_samples=(steps + 3) * 32)
    loader = DataLoader(dataset, batch_size=32, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    model = build_model(cfg.arch, len(set(labels)), "none").to(device).train()
    optimizer = Ranger(model.parameters(), lr=1e-5)
    criterion = nn.CrossEntropyLoss()
    seen, start = 0, None
    for step, (images, targets) in enumerate(loader):
        if step == 3:  # after warm-up (worker start, cudnn autotune)
            sync(device)
            start, seen = time.perf_counter(), 0
        images, targets = images.to(device), targets.to(device)
        loss = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # the reference loop reads the loss every step
        seen += images.shape[0]
    sync(device)
    return seen / (time.perf_counter() - start)


def measure_step(cfg: TrainConfig, classes: int, device: torch.device, steps: int, mode: str = "eager",
                 batch_multiplier: int = 1, channels_last: bool = True, precision: str = "auto") -> dict:
    """Warm-up seconds (the first steps, compilation included), steady images/s and peak memory (GiB) of the
    training step in ``mode`` on synthetic tensors already on the device; the Trainer's model set-up."""
    batch = cfg.batch_size * batch_multiplier
    variant_cfg = TrainConfig(**{**cfg.to_dict(), "batch_size": batch, "lr": cfg.lr * batch_multiplier})
    plan = choose_step_mode(mode, device, distributed=False, total_steps=10**9, optimizer=cfg.optimizer)
    torch.manual_seed(0)
    model = build_model(cfg.arch, classes, "none").to(device).train()
    dtype, precision_notice = choose_precision(precision, device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    net = wrap_network(model, plan)
    optimizer = make_optimizer(variant_cfg, model.parameters(), compiled=plan.compiles_optimizer)
    criterion = nn.CrossEntropyLoss()
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device).contiguous(
        memory_format=memory_format)
    targets = torch.randint(0, classes, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            sync(device)
            warmup = time.perf_counter() - start
            start = time.perf_counter()
        with autocast(device, dtype):
            loss = criterion(net(images).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    notice = "; ".join(text for text in (plan.notice, precision_notice) if text) or None
    return {"mode": plan.mode, "notice": notice, "precision": "bf16" if dtype is not None else "fp32",
            "batch_size": batch, "lr": variant_cfg.lr,
            "warmup_seconds": warmup, "img_s": steps * batch / seconds, "peak_memory_gib": peak}


def ceiling(cfg: TrainConfig, classes: int, device: torch.device, steps: int) -> tuple[float, float]:
    """Images/s and peak memory (GiB) of the eager step on synthetic tensors already on the device."""
    result = measure_step(cfg, classes, device, steps)
    return result["img_s"], result["peak_memory_gib"]


def project_path(cfg: TrainConfig) -> tuple[float, float, float, list[dict]]:
    """(last-epoch images/s, epoch seconds, end-to-end wall seconds, metrics rows) of ``braintumor train``."""
    start = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["images_per_second"], rows[-1]["seconds"], wall, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="folder-per-class training set (default: generated phantoms)")
    parser.add_argument("--arch", default=None, help="default resnet152 on CUDA, resnet18 on CPU")
    parser.add_argument("--image-size", type=int, default=None, help="default 224 on CUDA, 64 on CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="project/ceiling batch (default 256 CUDA, 16 CPU)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--ref-steps", type=int, default=None, help="timed steps of the reference loop")
    parser.add_argument("--ceiling-steps", type=int, default=None)
    parser.add_argument("--workers", type=int, default=min(15, os.cpu_count() or 1))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--train-step", default="auto", choices=STEP_MODES, help="step mode of (b) (default auto)")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated (d) rows from {', '.join(VARIANTS)}, or none "
                             f"(default: all on CUDA, {', '.join(CPU_VARIANTS)} on the CPU)")
    parser.add_argument("--variant-steps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file (default: refuse)")
    args = parser.parse_args(argv)
    try:
        refuse_overwrites({"--json": args.json}, args.overwrite)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    arch = args.arch or ("resnet152" if gpu else "resnet18")
    size = args.image_size or (224 if gpu else 64)
    batch = args.batch_size or (256 if gpu else 16)
    ref_steps = args.ref_steps or (60 if gpu else 4)
    ceiling_steps = args.ceiling_steps or (30 if gpu else 4)
    variant_steps = args.variant_steps or ceiling_steps
    variants = (list(VARIANTS) if gpu else list(CPU_VARIANTS)) if args.variants is None else \
        [name for name in args.variants.split(",") if name and name != "none"]
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({os.cpu_count()} cores)"

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from braintumor.synthetic.phantom import write_phantom_set

            data = str(write_phantom_set(Path(tmp) / "phantoms", per_class=16 if not gpu else 400, size=size))
        index = discover(data)
        classes = len(index.classes)
        cfg = TrainConfig(data=data, arch=arch, weights="none", image_size=size, epochs=args.epochs,
                          batch_size=batch, lr=1e-5, device=device.type, data_cache="auto", workers=args.workers,
                          out=str(Path(tmp) / "run"), progress=False, train_step=args.train_step)
        print(f"device: {name}; {arch} at {size} px; {len(index.paths)} images in {data}", flush=True)
        ref = reference_loop(index.paths, index.labels, cfg, device, ref_steps, args.workers)
        print(f"(a) reference loop: {ref:.0f} img/s", flush=True)
        project, epoch_seconds, wall, rows = project_path(cfg)
        print(f"(b) project train path: {project:.0f} img/s", flush=True)
        top, peak_gib = ceiling(cfg, classes, device, ceiling_steps)
        print(f"(c) ceiling: {top:.0f} img/s", flush=True)
        measured = {}
        for variant in variants:
            mode, multiplier, channels_last, precision = VARIANTS[variant]
            try:
                measured[variant] = measure_step(cfg, classes, device, variant_steps, mode, multiplier,
                                                 channels_last, precision)
            except Exception as err:  # a variant that fails is a result too; the others still run
                measured[variant] = {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"}
            print(f"(d) {variant}: {measured[variant]}", flush=True)
    flops = training_flops_per_image(arch, classes, size, device)
    peak_tflops = device_peak_tflops(name) if gpu else None
    mfu = (project * flops / (peak_tflops * 1e12)) if peak_tflops else None
    results = {"device": name, "date": date.today().isoformat(), "arch": arch, "image_size": size,
               "batch_size": batch, "images": len(index.paths), "reference_img_s": ref, "project_img_s": project,
               "ceiling_img_s": top, "project_epoch_seconds": epoch_seconds, "project_wall_seconds": wall,
               "train_gflops_per_image": flops / 1e9, "mfu": mfu, "peak_memory_gib": peak_gib,
               "project_first_epoch_seconds": rows[0]["seconds"],
               "project_seconds_to_first_epoch": rows[0].get("seconds_to_first_epoch"),
               "project_train_step": args.train_step, "variants": measured, "torch": torch.__version__}
    print(f"\n## Training throughput — {name}, {results['date']}, torch {torch.__version__}\n")
    print(f"{arch}, {size} px, {len(index.paths)} images; project/ceiling batch {batch}, reference batch 32\n")
    print("| path | images/s | vs (a) | vs (c) |")
    print("|---|---:|---:|---:|")
    print(f"| (a) reference loop: fp32, PIL DataLoader ({args.workers} workers), batch 32 | {ref:,.0f} | 1.00× | {ref / top:.0%} |")
    print(f"| (b) `braintumor train` (last of {args.epochs} epochs) | {project:,.0f} | {project / ref:.2f}× | {project / top:.0%} |")
    print(f"| (c) ceiling: synthetic tensors on the device | {top:,.0f} | {top / ref:.2f}× | 100% |")
    print(f"\nepoch time (b): {epoch_seconds:.2f} s incl. validation; end to end (checks, split, decode, "
          f"{args.epochs} epochs, report): {wall:.1f} s; training FLOPs/image {flops / 1e9:.1f} GFLOP; "
          f"MFU of (b): {'n/a' if mfu is None else f'{mfu:.1%}'}; peak memory (c): {peak_gib:.1f} GiB")
    print(f"first epoch (b): {rows[0]['seconds']:.2f} s ({rows[0]['seconds'] / epoch_seconds:.2f}× the last); "
          f"start of the run to the end of epoch 1: {rows[0].get('seconds_to_first_epoch', float('nan')):.1f} s")
    if measured:
        print(f"\n(d) step variants on synthetic tensors ({arch}, {size} px, {WARMUP_STEPS} warm-up steps, "
              f"{variant_steps} timed)\n")
        print("| variant | mode used | precision | batch | lr | warm-up (s) | images/s | vs eager | vs (a) | peak GiB |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
        eager = measured.get("eager", {}).get("img_s", top)
        for variant, row in measured.items():
            if "error" in row:
                print(f"| {variant} | failed: {row['error']} | | | | | | | | |")
                continue
            print(f"| {variant} | {row['mode']} | {row['precision']} | {row['batch_size']} | {row['lr']:.1e} | {row['warmup_seconds']:.1f} "
                  f"| {row['img_s']:,.0f} | {row['img_s'] / eager:.2f}× | {row['img_s'] / ref:.2f}× "
                  f"| {row['peak_memory_gib']:.1f} |")
        for variant in ("compile", "compile-step", "cuda-graphs"):
            row, base = measured.get(variant, {}), measured.get("eager", {})
            if row.get("mode") == variant and "img_s" in base and row["img_s"] > base["img_s"]:
                # Steps after which the compiled run has caught up with eager despite its longer warm-up.
                saved_per_step = row["batch_size"] / base["img_s"] - row["batch_size"] / row["img_s"]
                steps = (row["warmup_seconds"] - base["warmup_seconds"]) / saved_per_step
                results.setdefault("break_even_steps", {})[variant] = steps
                print(f"{variant} repays its warm-up after {steps:,.0f} steps (auto compiles from "
                      f"{AUTO_COMPILE_MIN_STEPS:,} steps)")
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
