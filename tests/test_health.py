"""The collapse guard names the metric and the step."""

import math

import pytest

from aasp_jax.train import health
from configs import common

OBJ = common.objective_config(depth=2)
GOOD = {'loss': 1.0, 'target_std': 0.5, 'prediction_std': 0.4, 'grad_norm': 2.0}


def test_healthy_metrics_pass():
  health.check_metrics(GOOD, 10, OBJ)


@pytest.mark.parametrize('name', ['loss', 'grad_norm'])
@pytest.mark.parametrize('value', [math.nan, math.inf])
def test_non_finite_stops_naming_metric_and_step(name, value):
  with pytest.raises(health.TrainingCollapsed, match=rf"step 37: metric '{name}' is"):
    health.check_metrics({**GOOD, name: value}, 37, OBJ)


@pytest.mark.parametrize('name', ['target_std', 'prediction_std'])
def test_collapsed_std_stops_naming_metric_and_step(name):
  with pytest.raises(health.TrainingCollapsed, match=rf'step 5: {name} = 0.001 is below'):
    health.check_metrics({**GOOD, name: 1e-3}, 5, OBJ)
