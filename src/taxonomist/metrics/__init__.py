"""Hierarchical metrics: pure, vectorised functions over node ids and probability arrays.

``compute_metrics(tax, label_probs, truth, ranks=None)`` returns the flat
``metrics.json`` dictionary; the building blocks are importable on their own.
Definitions, formulas and sources: docs/metrics.md.
"""

from .calibration import expected_calibration_error, reliability_by_level, reliability_diagram
from .flat import (
    ClassReport,
    LevelPredictions,
    class_report,
    label_positions,
    level_predictions,
    per_class_report,
    topk_accuracy,
)
from .hierarchical import (
    hierarchical_distance_at_k,
    hierarchical_prf,
    mean_distance,
    mean_path_distance,
    mean_rank_distance,
    mistake_severity,
    path_violation_rate,
    path_violations,
    ranked_distances,
)
from .selective import (
    darts_curve,
    haurc,
    hierarchically_correct,
    info_gain,
    node_coverage,
    risk_coverage_curve,
)
from .suite import compute_metrics, decision_metrics

__all__ = [
    "compute_metrics", "decision_metrics",
    "level_predictions", "LevelPredictions", "class_report", "per_class_report", "ClassReport",
    "label_positions", "topk_accuracy",
    "mistake_severity", "hierarchical_distance_at_k", "mean_distance", "mean_path_distance",
    "mean_rank_distance", "ranked_distances", "hierarchical_prf", "path_violations", "path_violation_rate",
    "expected_calibration_error", "reliability_diagram", "reliability_by_level",
    "node_coverage", "info_gain", "hierarchically_correct", "risk_coverage_curve", "haurc", "darts_curve",
]
