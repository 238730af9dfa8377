"""The three things people add to CAST, one registry each (one file per concept):

- `arms.py`: baseline arms of stage 2 (which units an arm skips), with their figure style.
- `metrics.py`: evaluation metrics (per-prompt key, direction, role, cost), read by the evaluation,
  the report, the validation monitor and the cost model.
- `models.py`: model families (loader for both TransformerLens lines, context length, end-of-turn
  token, bias-free attention, prompt format), read by `model.load_model` and `data.end_of_turn_id`.

    from cast_interp.registry import register_arm, register_metric, register_model_family
"""

from .arms import ArmSpec, arm_names, baseline_names, get_arm, register_arm, unregister_arm
from .metrics import MetricSpec, get_metric, metric_names, register_metric, unregister_metric
from .models import (ModelFamily, family_of, get_family, register_model_family,
                     unregister_model_family)

__all__ = ["ArmSpec", "arm_names", "baseline_names", "get_arm", "register_arm", "unregister_arm",
           "MetricSpec", "get_metric", "metric_names", "register_metric", "unregister_metric",
           "ModelFamily", "family_of", "get_family", "register_model_family",
           "unregister_model_family"]
