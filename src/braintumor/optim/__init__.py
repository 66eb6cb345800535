"""Optimizers written for braintumor, and the one table of the optimizers a run may choose."""

from braintumor.optim.ranger import Ranger
from braintumor.optim.table import OPTIMIZER_TABLE, OPTIMIZERS, build_optimizer

__all__ = ["OPTIMIZERS", "OPTIMIZER_TABLE", "Ranger", "build_optimizer"]
