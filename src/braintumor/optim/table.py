"""The one optimizer table: name -> class, fixed defaults, and which run options it takes.

``--optimizer`` offers exactly these names (``training.config.OPTIMIZERS`` is ``tuple(OPTIMIZER_TABLE)``) and the
trainer builds them with :func:`build_optimizer`. Ranger is the project's default; the others are there to
compare at the same learning rate (benchmarks/optimizer_compare.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from braintumor.choices import OPTIMIZERS
from braintumor.optim.ranger import Ranger
from braintumor.optim.ranger_compiled import CompiledRanger


@dataclass(frozen=True)
class OptimizerEntry:
    """An optimizer class, its fixed keyword defaults, the constructor arguments filled from run options
    (argument -> option name), and its update fused by torch.compile (``compiled``), when it has one."""

    cls: type[torch.optim.Optimizer]
    defaults: dict[str, Any] = field(default_factory=dict)
    from_options: dict[str, str] = field(default_factory=dict)
    compiled: type[torch.optim.Optimizer] | None = None


OPTIMIZER_TABLE: dict[str, OptimizerEntry] = {
    "ranger": OptimizerEntry(Ranger, from_options={"k": "lookahead_k", "alpha": "lookahead_alpha", "gc": "gc"},
                             compiled=CompiledRanger),
    # RAdam with Ranger's moments and decoupled decay: Ranger without LookAhead and gradient centralization.
    "radam": OptimizerEntry(torch.optim.RAdam, dict(betas=(0.95, 0.999), eps=1e-5, decoupled_weight_decay=True)),
    "adam": OptimizerEntry(torch.optim.Adam),
    "adamw": OptimizerEntry(torch.optim.AdamW),
    "sgd": OptimizerEntry(torch.optim.SGD, dict(momentum=0.9, nesterov=True)),
}
if tuple(OPTIMIZER_TABLE) != OPTIMIZERS:  # the parser offers braintumor.choices' names without importing this
    raise ImportError(f"OPTIMIZER_TABLE implements {tuple(OPTIMIZER_TABLE)}, braintumor.choices offers {OPTIMIZERS}")


def build_optimizer(name: str, params: Iterable, *, lr: float, weight_decay: float = 0.0, compiled: bool = False,
                    options: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """The optimizer ``name`` of the table over ``params``; ``options`` holds run options by name (extra ones
    are ignored, so a whole run config may be passed); ``compiled`` picks the fused update where there is one."""
    if name not in OPTIMIZER_TABLE:
        raise ValueError(f"unknown optimizer {name!r}: one of {', '.join(OPTIMIZERS)}")
    entry = OPTIMIZER_TABLE[name]
    options = options or {}
    taken = {argument: options[option] for argument, option in entry.from_options.items() if option in options}
    cls = entry.compiled if compiled and entry.compiled is not None else entry.cls
    return cls(params, lr=lr, weight_decay=weight_decay, **entry.defaults, **taken)
