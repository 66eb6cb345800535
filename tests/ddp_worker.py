"""torchrun worker of tests/test_distributed.py (not a test module).

    python -m torch.distributed.run ... tests/ddp_worker.py DUMP_DIR MODE train DATA --flags...

MODE ``cli`` runs ``braintumor`` exactly as a user would. ``batch-norm`` and ``group-norm`` parse the same
command line with the CLI's own parser, train through the Python API with an injected model factory, and save
each rank's final weights as DUMP_DIR/rank<N>.pt for the test to compare. ``group-norm`` swaps BatchNorm for
GroupNorm and switches the head's dropout off: both draw on the batch split and the RNG, so without them two
processes on a global batch must equal one process on it.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch
from torch import nn

from braintumor import cli
from braintumor.training.config import resolve_config
from braintumor.models.network import build_model
from braintumor.training.trainer import resume, train

FACTORIES = {
    "batch-norm": build_model,
    "group-norm": functools.partial(build_model, norm_layer=lambda channels: nn.GroupNorm(8, channels),
                                    head_dropout=0.0),
}


def main(argv: list[str]) -> int:
    dump_dir, mode, command = Path(argv[0]), argv[1], argv[2:]
    if mode == "cli":
        return cli.main(command)
    built: list[nn.Module] = []

    def factory(arch: str, num_classes: int, weights: str) -> nn.Module:
        built.append(FACTORIES[mode](arch, num_classes, weights))
        return built[-1]

    cli.configure_logging()  # epoch lines on stdout, as the CLI prints them
    args = cli.build_parser().parse_args(command)
    given = cli.train_options(args)
    if args.resume:
        resume(args.resume, given, model_factory=factory)
    else:
        train(resolve_config({}, given), model_factory=factory)
    # built[0] is the trained network; rank 0 builds more afterwards to read best.pt back for the final report
    torch.save(built[0].state_dict(), dump_dir / f"rank{os.environ.get('RANK', '0')}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
