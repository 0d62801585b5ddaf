"""Router health statistics and router agreement, kept importable here: they are part of the
routing policy (`megamor.model.routing`), where they are defined."""

from megamor.model.routing import (
    HEALTH_PREFIX,
    SATURATION_EPS,
    agreement_counts,
    precision_recall,
    step_health,
    trace_agreement,
)

__all__ = ["HEALTH_PREFIX", "SATURATION_EPS", "agreement_counts", "precision_recall", "step_health", "trace_agreement"]
