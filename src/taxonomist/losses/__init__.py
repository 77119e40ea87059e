"""Losses (a registry; every loss accepts target nodes at any depth, ``-1`` ignored) and task weighting.

Built-in losses: ``ce``, ``per_rank_ce`` (ce.py); ``taxonomy_smoothing``, ``soft_labels``
(smoothing.py); ``hxe`` (hxe.py); ``expected_distance`` (expected_distance.py); ``hier_bce``,
``focal``, ``asymmetric`` for the node multi-hot head (multilabel.py); ``attribute_ce`` and
``composite`` (attributes.py). Task weightings: ``static`` (weighting.py), ``gradnorm``
(gradnorm.py), ``uncertainty`` (uncertainty.py). See docs/models.md, "Losses and task weighting".
"""

from .attributes import AttributeCrossEntropy, CompositeLoss, attribute_outputs, with_attribute_losses
from .base import LOSSES, Loss, connected_zero, create_loss, list_losses, loss_options, masked_mean, register_loss
from .ce import CrossEntropy, PerRankCrossEntropy
from .expected_distance import ExpectedDistance
from .gradnorm import GradNorm
from .hxe import HierarchicalCrossEntropy
from .multilabel import AsymmetricMultiHot, FocalMultiHot, HierarchicalBCE, NodeMultiHotLoss
from .smoothing import SoftLabels, TaxonomySmoothing
from .uncertainty import UncertaintyWeighting
from .weighting import (WEIGHTINGS, StaticWeighting, TaskWeighting, create_weighting, list_weightings,
                        register_weighting)

__all__ = ["LOSSES", "Loss", "connected_zero", "create_loss", "list_losses", "loss_options", "masked_mean",
           "register_loss", "CrossEntropy", "PerRankCrossEntropy", "TaxonomySmoothing", "SoftLabels",
           "HierarchicalCrossEntropy", "ExpectedDistance", "NodeMultiHotLoss", "HierarchicalBCE",
           "FocalMultiHot", "AsymmetricMultiHot", "AttributeCrossEntropy", "CompositeLoss", "attribute_outputs",
           "with_attribute_losses", "WEIGHTINGS", "StaticWeighting", "TaskWeighting", "GradNorm",
           "UncertaintyWeighting", "create_weighting", "list_weightings", "register_weighting"]
