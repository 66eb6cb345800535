"""Optimizers written for braintumor."""

from braintumor.optim.ranger import Ranger

__all__ = ["Ranger"]
