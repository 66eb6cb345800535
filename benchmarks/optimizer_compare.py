"""Does Ranger help? Train the same small model with Ranger + GC, Ranger without GC, RAdam and Adam.

Every run goes through ``braintumor.training.trainer.train`` (the project's loop, not a copy of it) with the same lr, data,
batch size, epochs and constant schedule; only the optimizer changes. A run's seed fixes the model's
initialisation, the batch order and the augmentation, so for one seed all optimizers start from the same
weights and see the same batches: the comparison is paired. Training and validation data are two phantom sets
written with different seeds (or your own ``--data`` / ``--val`` folders), identical for every run.

The defaults train from random initialisation, where lr 1e-3 is needed (the fine-tuning recipe's 1e-5 barely
moves a random ResNet in a few epochs); pass ``--lr`` to compare elsewhere. RAdam uses Ranger's betas
(0.95, 0.999) and eps 1e-5, so "Ranger without GC" vs "RAdam" isolates LookAhead and "Ranger + GC" vs
"Ranger without GC" isolates gradient centralization; Adam uses PyTorch's defaults (betas (0.9, 0.999),
eps 1e-8), see ``braintumor.training.trainer.make_optimizer``.

Writes ``optimizer_compare.md`` (table), ``optimizer_compare.png`` (plot) and ``optimizer_compare.json``
(every epoch of every run) to ``--out``; prints the table. Asserts nothing.

    python benchmarks/optimizer_compare.py --out /tmp/optimizer_compare
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from braintumor.training.config import TrainConfig
from braintumor.errors import UserError
from braintumor.synthetic.phantom import write_phantom_set
from braintumor.training.trainer import train
from braintumor.utils.atomic import atomic_write
from braintumor.utils.jsonfiles import write_json
from braintumor.utils.outputs import refuse_overwrites
from braintumor.visualize.figures import save_figure

# name -> (label in table and plot, TrainConfig.optimizer, TrainConfig.gc)
OPTIMIZERS: dict[str, tuple[str, str, str]] = {
    "ranger-gc": ("Ranger + GC", "ranger", "all"),
    "ranger": ("Ranger, no GC", "ranger", "none"),
    "radam": ("RAdam", "radam", "none"),
    "adam": ("Adam", "adam", "none"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/optimizer_compare", help="folder for the table, plot and JSON")
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one run per seed (>= 3 advised)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="the same for every optimizer (random init)")
    parser.add_argument("--per-class", type=int, default=60, help="phantom training images per class")
    parser.add_argument("--val-per-class", type=int, default=40, help="phantom validation images per class")
    parser.add_argument("--phantom-size", type=int, default=128, help="side of the phantom PNGs (resized to "
                        "--image-size by the data path)")
    parser.add_argument("--data-seed", type=int, default=0, help="phantom seed of the training set; the "
                        "validation set uses this + 1000")
    parser.add_argument("--data", help="your own folder-per-class training set instead of phantoms")
    parser.add_argument("--val", help="your own validation folder (required with --data)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep-runs", action="store_true", help="keep every run folder under OUT/runs "
                        "(checkpoints included) instead of a temporary folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the table, plot and JSON of an earlier run in --out (default: refuse)")
    args = parser.parse_args(argv)
    if (args.data is None) != (args.val is None):
        raise UserError("--data and --val go together: every optimizer must validate on the same fixed folder")
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds must be distinct, got {args.seeds}")
    for name in ("per_class", "val_per_class"):
        if getattr(args, name) < 2:
            raise UserError(f"--{name.replace('_', '-')} must be at least 2, got {getattr(args, name)}")
    return args


def machine_description(device: str) -> str:
    """Which hardware the numbers come from, in one line."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}), {os.cpu_count()} cores visible, torch uses {torch.get_num_threads()} threads"


def run_all(args: argparse.Namespace, work: Path) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """Train every (optimizer, seed) pair; returns optimizer -> seed -> metrics rows (one per epoch)."""
    if args.data is None:
        data = write_phantom_set(work / "data" / "train", args.per_class, args.phantom_size, args.data_seed)
        val = write_phantom_set(work / "data" / "val", args.val_per_class, args.phantom_size,
                                args.data_seed + 1000)
    else:
        data, val = Path(args.data), Path(args.val)
    results: dict[str, dict[int, list[dict[str, Any]]]] = {}
    total = len(args.optimizers) * len(args.seeds)
    for seed in args.seeds:  # seed-major: an interrupted run still has every optimizer for the first seeds
        for name in args.optimizers:
            label, optimizer, gc = OPTIMIZERS[name]
            done = sum(len(by_seed) for by_seed in results.values())
            print(f"\n=== run {done + 1}/{total}: {label}, seed {seed} ===", flush=True)
            cfg = TrainConfig(data=str(data), val=str(val), arch=args.arch, weights="none",
                              image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
                              lr=args.lr, optimizer=optimizer, gc=gc, scheduler="constant", seed=seed,
                              device=args.device, data_cache="memory", workers=0,
                              out=str(work / "runs" / f"{name}-seed{seed}"), progress=False)
            start = time.perf_counter()
            result = train(cfg)
            rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
                    if line.strip()]
            rows[-1]["run_wall_seconds"] = time.perf_counter() - start
            results.setdefault(name, {})[seed] = rows
    return results


def accuracy_matrix(by_seed: dict[int, list[dict[str, Any]]]) -> np.ndarray:
    """(seeds, epochs) validation accuracy in percent."""
    return np.array([[100 * row["val_accuracy"] for row in rows] for _, rows in sorted(by_seed.items())])


def mean_std(values: np.ndarray) -> str:
    """'mean ± sample std' over seeds (std needs two seeds)."""
    if values.size < 2:
        return f"{values.mean():.1f}"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def format_report(results, args: argparse.Namespace, machine: str, started: datetime, wall: float) -> str:
    """The markdown written to optimizer_compare.md and printed."""
    names = [name for name in args.optimizers if name in results]
    acc = {name: accuracy_matrix(results[name]) for name in names}
    data = (f"phantoms: {args.per_class}/class train (seed {args.data_seed}), {args.val_per_class}/class "
            f"validation (seed {args.data_seed + 1000}), {args.phantom_size} px PNGs"
            if args.data is None else f"train {args.data}, validation {args.val}")
    lines = [
        f"## Optimizer comparison — {machine}; {started:%Y-%m-%d %H:%M}; torch {torch.__version__}",
        "",
        f"{args.arch} from random init, {args.image_size} px, batch {args.batch_size}, lr {args.lr:g} for every "
        f"optimizer, constant schedule, no weight decay, {args.epochs} epochs, seeds {' '.join(map(str, args.seeds))} "
        f"(a seed fixes init, batch order and augmentation, identical across optimizers); {data}.",
        "",
        "Validation accuracy (%), mean ± sample std over seeds. *best*: each seed's best epoch, then averaged.",
        "",
        "| epoch | " + " | ".join(OPTIMIZERS[name][0] for name in names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for epoch in range(args.epochs):
        lines.append(f"| {epoch + 1} | " + " | ".join(mean_std(acc[name][:, epoch]) for name in names) + " |")
    lines.append("| **final** | " + " | ".join(f"**{mean_std(acc[name][:, -1])}**" for name in names) + " |")
    lines.append("| **best** | " + " | ".join(f"**{mean_std(acc[name].max(axis=1))}**" for name in names) + " |")
    lines += ["", "Final validation accuracy (%) per seed, and the final epoch's training loss (mean over seeds):", "",
              "| optimizer | " + " | ".join(f"seed {seed}" for seed in args.seeds) + " | train loss |",
              "|---|" + "---:|" * (len(args.seeds) + 1)]
    for name in names:
        runs = [results[name][seed] for seed in args.seeds if seed in results[name]]
        finals = " | ".join(f"{100 * rows[-1]['val_accuracy']:.1f}" for rows in runs)
        loss = np.mean([rows[-1]["train_loss"] for rows in runs])
        lines.append(f"| {OPTIMIZERS[name][0]} | {finals} | {loss:.3f} |")
    lines += ["", f"Total wall time {wall / 60:.1f} min (every run, set-up and final report included). "
              "Plot: mean curve, band = min–max over seeds.", ""]
    return "\n".join(lines)


def plot(results, args: argparse.Namespace, path: Path) -> None:
    """Validation accuracy and train loss per epoch: mean line, min–max band over seeds, one colour each."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    epochs = np.arange(1, args.epochs + 1)
    for name in args.optimizers:
        if name not in results:
            continue
        label = OPTIMIZERS[name][0]
        runs = [rows for _, rows in sorted(results[name].items())]
        for ax, values in ((acc_ax, accuracy_matrix(results[name])),
                           (loss_ax, np.array([[row["train_loss"] for row in rows] for rows in runs]))):
            (line,) = ax.plot(epochs, values.mean(axis=0), marker="o", markersize=4, label=label)
            ax.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.15)
    acc_ax.set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy (%)")
    loss_ax.set(title="Training loss", xlabel="epoch", ylabel="cross-entropy")
    for ax in (acc_ax, loss_ax):
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    acc_ax.legend(loc="lower right")
    fig.suptitle(f"{args.arch} from random init, {args.image_size} px, lr {args.lr:g}, batch {args.batch_size}: "
                 f"mean of {len(args.seeds)} seed{'s' if len(args.seeds) > 1 else ''}, band = min–max")
    save_figure(fig, path, tight=False)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, train every run, write and print the table and plot."""
    try:
        args = parse_args(argv)
        out = Path(args.out)
        refuse_overwrites([("--out", out / f"optimizer_compare{suffix}") for suffix in (".md", ".json", ".png")],
                          args.overwrite)
        out.mkdir(parents=True, exist_ok=True)
        machine = machine_description(args.device)
        started = datetime.now()
        print(f"{machine}; {started:%Y-%m-%d %H:%M}; torch {torch.__version__}", flush=True)
        start = time.perf_counter()
        if args.keep_runs:
            results = run_all(args, out)
        else:
            with tempfile.TemporaryDirectory(prefix="optimizer_compare-") as tmp:
                results = run_all(args, Path(tmp))
        wall = time.perf_counter() - start
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    report = format_report(results, args, machine, started, wall)
    atomic_write(out / "optimizer_compare.md", lambda handle: handle.write(report), "w")
    write_json(out / "optimizer_compare.json",
               {"machine": machine, "date": started.isoformat(timespec="seconds"), "torch": torch.__version__,
                "args": vars(args), "wall_seconds": wall, "runs": results}, indent=1)
    plot(results, args, out / "optimizer_compare.png")
    print("\n" + report)
    print(f"wrote {out / 'optimizer_compare.md'}, {out / 'optimizer_compare.png'}, {out / 'optimizer_compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
