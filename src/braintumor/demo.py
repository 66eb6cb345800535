"""The one-command demo: phantom slices → a small model trained on the CPU → a test report."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from braintumor.training.config import TrainConfig
from braintumor.synthetic.phantom import write_phantom_set

DEMO_IMAGE_SIZE = 128
DEMO_PER_CLASS = 128
DEMO_TEST_PER_CLASS = 50
DEMO_EPOCHS = 6


def demo_config(train_dir: Path, run_dir: Path, epochs: int, seed: int) -> TrainConfig:
    """A configuration that learns the phantoms from random init in minutes on 2 CPU cores.

    Random initialisation needs a far larger learning rate than fine-tuning (1e-5 is for ImageNet weights).
    """
    return TrainConfig(data=str(train_dir), arch="resnet18", weights="none", image_size=DEMO_IMAGE_SIZE,
                       epochs=epochs, batch_size=16, lr=3e-3, scheduler="cosine", device="cpu",
                       data_cache="memory", workers=0, seed=seed, out=str(run_dir), name="demo")


def run_demo(out: str | Path, per_class: int | None = None, epochs: int | None = None, seed: int = 0) -> dict:
    """Generate train and test phantoms, train, evaluate on the held-out test set; returns the test report."""
    from braintumor.evaluation.evaluate import evaluate_checkpoint
    from braintumor.evaluation.report import format_table
    from braintumor.training.trainer import train

    out = Path(out)
    per_class = per_class or DEMO_PER_CLASS
    # Phantoms are deterministic for (seed, per_class): regenerate only when missing.
    train_dir = out / f"phantoms-seed{seed}-n{per_class}" / "train"
    test_dir = out / f"phantoms-seed{seed}-n{per_class}" / "test"
    if not train_dir.is_dir():
        write_phantom_set(train_dir, per_class=per_class, size=DEMO_IMAGE_SIZE, seed=seed)
    if not test_dir.is_dir():
        write_phantom_set(test_dir, per_class=DEMO_TEST_PER_CLASS, size=DEMO_IMAGE_SIZE, seed=seed + 10_000)
    run_dir = out / f"{datetime.now():%Y%m%d-%H%M%S}"
    print(f"phantom data: {train_dir} ({per_class} per class), held-out test set: {test_dir}", flush=True)
    result = train(demo_config(train_dir, run_dir, epochs or DEMO_EPOCHS, seed))
    report = evaluate_checkpoint(result.best_checkpoint, test_dir, run_dir / "test-report", device="cpu")
    print(format_table(report["metrics"]))
    print(f"\nheld-out phantom test accuracy: {report['metrics']['accuracy']:.2%}")
    print(f"test report:      {run_dir / 'test-report' / 'report.md'}")
    print(f"confusion matrix: {run_dir / 'test-report' / 'confusion_matrix.png'}")
    print(f"checkpoint:       {result.best_checkpoint}  (try: braintumor predict {result.best_checkpoint} "
          f"{test_dir / 'glioma'})")
    return report
