"""Losses (a registry; every loss accepts target nodes at any depth) and task weighting."""

from .base import LOSSES, Loss, connected_zero, create_loss, list_losses, loss_options, register_loss
from .ce import CrossEntropy, PerRankCrossEntropy
from .weighting import (WEIGHTINGS, StaticWeighting, TaskWeighting, create_weighting, list_weightings,
                        register_weighting)

__all__ = ["LOSSES", "Loss", "connected_zero", "create_loss", "list_losses", "loss_options", "register_loss",
           "CrossEntropy", "PerRankCrossEntropy", "WEIGHTINGS", "StaticWeighting", "TaskWeighting",
           "create_weighting", "list_weightings", "register_weighting"]
