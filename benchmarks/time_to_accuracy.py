"""Time to accuracy: train from random initialisation with a fixed seed and report the wall time at which the
validation accuracy first reaches 95 %, 97 % and 98 %, and the final accuracy.

Wall time is counted from the start of ``braintumor.train.train`` (file checks, grouped split and decoding
included) and, separately, from the start of the first epoch.
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

from braintumor.config import TrainConfig
from braintumor.train import train

THRESHOLDS = (0.95, 0.97, 0.98)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder-per-class training set (15 %% is held out)")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--optimizer", default="ranger")
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="run folder to keep (default: a temporary one)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or str(Path(tmp) / "run")
        cfg = TrainConfig(data=args.data, arch=args.arch, weights="none", image_size=args.image_size,
                          epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                          scheduler="cosine", warmup_epochs=args.warmup_epochs,
                          label_smoothing=args.label_smoothing, seed=args.seed, device=args.device,
                          data_cache="auto", workers=min(15, os.cpu_count() or 1), out=out, progress=False)
        start = time.perf_counter()
        result = train(cfg)
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    setup = wall - rows[-1]["elapsed_seconds"]  # before the first epoch and the final report after it
    name = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else \
        f"CPU ({os.cpu_count()} cores)"
    reached = {}
    for threshold in THRESHOLDS:
        hit = next((row for row in rows if row["val_accuracy"] >= threshold), None)
        reached[threshold] = None if hit is None else (hit["epoch"], hit["elapsed_seconds"])
    print(f"\n## Time to accuracy — {name}, {date.today().isoformat()}, torch {torch.__version__}\n")
    print(f"{args.arch} from random init, {args.image_size} px, batch {args.batch_size}, {args.optimizer} lr "
          f"{args.lr:g} cosine ({args.warmup_epochs:g} warm-up epochs), label smoothing {args.label_smoothing:g}, "
          f"{args.epochs} epochs, seed {args.seed}; validation: 15 % grouped stratified split\n")
    print("| validation accuracy | epoch | seconds of training | seconds incl. set-up |")
    print("|---|---:|---:|---:|")
    for threshold, value in reached.items():
        if value is None:
            print(f"| ≥ {threshold:.0%} | not reached | | |")
        else:
            print(f"| ≥ {threshold:.0%} | {value[0]} | {value[1]:.1f} | {value[1] + setup:.1f} |")
    best = max(row["val_accuracy"] for row in rows)
    print(f"\nfinal validation accuracy {rows[-1]['val_accuracy']:.2%} (best {best:.2%}) after {len(rows)} epochs; "
          f"total wall time {wall:.1f} s, of which {setup:.1f} s set-up and final report")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "args": vars(args), "wall_seconds": wall,
                                               "reached": {str(k): v for k, v in reached.items()},
                                               "epochs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
