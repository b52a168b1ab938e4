"""The collapse guard: stop training with a message naming the metric and the step when the loss is
not finite or the teacher targets / student predictions collapse to a constant."""

import math

from ml_collections import ConfigDict


class TrainingCollapsed(RuntimeError):
  """Training cannot continue meaningfully; the message says which metric, at which step, and why."""


def check_metrics(metrics: dict, step: int, objective_cfg: ConfigDict) -> None:
  """Raises TrainingCollapsed on a non-finite metric or a standard deviation below its threshold.

  Args:
    metrics: host floats from the train step.
    step: the step that produced them.
    objective_cfg: `config.objective` (min_target_std, min_prediction_std).
  """
  for name, value in sorted(metrics.items()):
    if not math.isfinite(value):
      raise TrainingCollapsed(
        f'step {step}: metric {name!r} is {value}; training diverged. Lower optimizer.lr or '
        'optimizer.clip_norm, or check the input data (the pipeline counts skipped clips).'
      )
  thresholds = {
    'target_std': objective_cfg.min_target_std,
    'prediction_std': objective_cfg.min_prediction_std,
  }
  for name, minimum in thresholds.items():
    if name in metrics and metrics[name] < minimum:
      raise TrainingCollapsed(
        f'step {step}: {name} = {metrics[name]:.3g} is below objective.min_{name} = {minimum:g}; '
        'the representations have collapsed to a constant. Raise objective.contrastive_weight, '
        'lower the learning rate, or slow the EMA (optimizer.ema_start).'
      )
