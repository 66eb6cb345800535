"""Time to accuracy of a training recipe over several seeds.

    python benchmarks/time_to_accuracy.py --data Training --recipe scratch-gpu --seeds 0 1 2
    python benchmarks/time_to_accuracy.py --summarize RUN_DIR [RUN_DIR ...]   # runs made before

Each seed trains the recipe (flags such as --epochs override it) on the same 15 % duplicate-grouped validation
split (the split's seed stays fixed with --split-seed, so only initialisation, shuffling and augmentation change
with the seed). Reported: per seed and as mean ± standard deviation, the best and the final validation accuracy,
and the wall time (seconds since the first epoch started) at which validation first reached 97 / 98 / 99 %.
``--summarize`` reads the metrics.jsonl of finished run folders instead of training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from braintumor.training.config import read_recipe, resolve_config
from braintumor.training.trainer import train
from braintumor.training.step import PRECISIONS
from braintumor.errors import UserError
from braintumor.utils.jsonfiles import write_json
from braintumor.utils.outputs import refuse_overwrites

THRESHOLDS = (0.97, 0.98, 0.99)


def summarize_run(rows: list[dict]) -> dict:
    """Best / final accuracy and seconds to each threshold (None: not reached) of one run's metrics rows."""
    reached = {}
    for threshold in THRESHOLDS:
        hit = next((row for row in rows if row["val_accuracy"] >= threshold), None)
        reached[str(threshold)] = None if hit is None else {"epoch": hit["epoch"],
                                                            "seconds": hit["elapsed_seconds"]}
    return {"best": max(row["val_accuracy"] for row in rows), "final": rows[-1]["val_accuracy"],
            "epochs": len(rows), "train_seconds": rows[-1]["elapsed_seconds"], "reached": reached}


def mean_std(values: list[float], digits: int = 2) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def print_table(runs: dict[str, dict], title: str) -> None:
    print(f"\n## {title}\n")
    head = "| seed | best val % | final val % | epochs | train s | " + " | ".join(
        f"s to {t:.0%}" for t in THRESHOLDS) + " |"
    print(head)
    print("|" + "---|" * (5 + len(THRESHOLDS)))
    for seed, run in runs.items():
        times = [("–" if run["reached"][str(t)] is None else f"{run['reached'][str(t)]['seconds']:.0f}")
                 for t in THRESHOLDS]
        print(f"| {seed} | {100 * run['best']:.2f} | {100 * run['final']:.2f} | {run['epochs']} | "
              f"{run['train_seconds']:.0f} | " + " | ".join(times) + " |")
    values = list(runs.values())
    times = []
    for t in THRESHOLDS:
        hits = [run["reached"][str(t)]["seconds"] for run in values if run["reached"][str(t)] is not None]
        times.append(f"{mean_std(hits, 0)} ({len(hits)}/{len(values)})")
    print(f"| mean ± sd | {mean_std([100 * r['best'] for r in values])} | {mean_std([100 * r['final'] for r in values])}"
          f" | | {mean_std([r['train_seconds'] for r in values], 0)} | " + " | ".join(times) + " |")


def device_name(device: str) -> str:
    if torch.cuda.is_available() and device != "cpu":
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="folder-per-class training set (15 %% is held out)")
    parser.add_argument("--recipe", default="scratch-gpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the validation split (fixed)")
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs")
    parser.add_argument("--image-size", type=int, help="override the recipe's image size")
    parser.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    parser.add_argument("--arch", help="override the recipe's architecture")
    parser.add_argument("--progressive-resize", type=int, help="override the recipe's start size (0: off)")
    parser.add_argument("--precision", choices=PRECISIONS, help="override the recipe's training precision")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="keep the run folders under this folder (default: temporary)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--summarize", nargs="+", metavar="RUN_DIR", help="report finished runs, train nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file (default: refuse)")
    args = parser.parse_args(argv)
    try:
        refuse_overwrites({"--json": args.json}, args.overwrite)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    runs: dict[str, dict] = {}
    if args.summarize:
        for run_dir in map(Path, args.summarize):
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            runs[run_dir.name] = summarize_run(rows)
        print_table(runs, f"Time to accuracy of {len(runs)} finished run(s)")
    else:
        if not args.data:
            parser.error("--data is required unless --summarize is given")
        overrides = {key: getattr(args, key)
                     for key in ("epochs", "image_size", "batch_size", "arch", "progressive_resize", "precision")}
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(args.out or tmp)
            for seed in args.seeds:
                cfg = resolve_config(read_recipe(args.recipe), {
                    **overrides, "data": args.data, "seed": seed, "device": args.device, "progress": False,
                    "out": str(root / f"seed{seed}"), "split_seed": args.split_seed})
                start = time.perf_counter()
                result = train(cfg)
                rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
                runs[str(seed)] = {**summarize_run(rows), "wall_seconds": time.perf_counter() - start}
        print_table(runs, f"Time to accuracy — recipe {args.recipe}, {device_name(args.device)}, "
                          f"{date.today().isoformat()}, torch {torch.__version__}")
    if args.json:
        write_json(args.json, {"device": device_name(args.device), "args": vars(args), "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
