"""Turn a finished training run into the reference model shipped in the package (see MODEL_CARD.md).

    python scripts/make_reference_model.py RUN_DIR [--image-size N] [--out PATH]

Keeps what inference needs and nothing else: the weights that were validated (the EMA weights when the run used
--ema) in float16, the class list, preprocessing (image size, mean, std), the TTA setting, the run's recipe and
validation accuracy. float16 halves the file (ResNet-18: 22.9 MB instead of 45.8 MB); the weights are loaded
back into float32, and predictions were checked against the float32 run (MODEL_CARD.md). Prints the file's
SHA-256, which MODEL_CARD.md quotes and tests/test_reference.py checks.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path


from braintumor.models.checkpoint import (REFERENCE_MODEL, inference_payload, load_checkpoint, resolve_checkpoint,
                                  save_checkpoint, spec_of, validated_weights)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--image-size", type=int, help="inference size to store (default: the run's)")
    parser.add_argument("--tta", choices=("run", "on", "off"), default="run",
                        help="store mirror test-time augmentation on or off (default: as the run validated)")
    parser.add_argument("--out", type=Path, default=REFERENCE_MODEL)
    args = parser.parse_args(argv)

    source = resolve_checkpoint(args.run_dir)
    ckpt = load_checkpoint(source)
    spec = spec_of(ckpt, source)
    if args.image_size:
        spec = spec.replace(image_size=int(args.image_size))
    if args.tta != "run":
        spec = spec.replace(tta=args.tta == "on")
    half = {key: value.half() if value.is_floating_point() else value
            for key, value in validated_weights(ckpt).items()}
    # The spec carries the statistics fitted after training (OOD detector, temperature) when present.
    payload = inference_payload(half, spec, config=ckpt["config"], epoch=ckpt["epoch"],
                                best_val_accuracy=ckpt["best_val_accuracy"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(payload, args.out)
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({size_mb:.1f} MB), sha256 {sha256(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
