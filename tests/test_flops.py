"""FLOPs counted from jaxprs (aasp_jax.train.flops): analytic answers, and XLA's count as reference."""

import jax
import jax.numpy as jnp
import pytest

import train_helpers
from aasp_jax.train import flops
from aasp_jax.train import state as state_lib
from aasp_jax.train import step as step_lib


def test_batched_matmul_is_two_flops_per_multiply_add():
  a = jax.ShapeDtypeStruct((3, 5, 7), jnp.float32)
  b = jax.ShapeDtypeStruct((3, 7, 11), jnp.float32)
  assert flops.function_flops(jnp.matmul, a, b) == 2 * 3 * 5 * 7 * 11


def test_grouped_strided_convolution():
  x = jax.ShapeDtypeStruct((2, 8, 20, 18), jnp.float32)  # NCHW, 8 input channels
  w = jax.ShapeDtypeStruct((6, 4, 3, 5), jnp.float32)  # OIHW, 2 groups of 4 input channels

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (2, 3), 'VALID', feature_group_count=2)

  out_h, out_w = (20 - 3) // 2 + 1, (18 - 5) // 3 + 1
  assert flops.function_flops(conv, x, w) == 2 * (2 * 6 * out_h * out_w) * (4 * 3 * 5)


def test_a_scan_body_counts_once_per_iteration_like_the_unrolled_loop():
  x = jax.ShapeDtypeStruct((4, 16), jnp.float32)
  ws = jax.ShapeDtypeStruct((6, 16, 16), jnp.float32)

  def scanned(x, ws):
    return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0].sum()

  def unrolled(x, ws):
    for i in range(6):
      x = jnp.tanh(x @ ws[i])
    return x.sum()

  forward = 6 * 2 * 4 * 16 * 16
  assert flops.function_flops(scanned, x, ws) == forward == flops.function_flops(unrolled, x, ws)
  # Backward: one matmul for the carry's gradient and one for the weights', per layer.
  grad = jax.grad(scanned, argnums=(0, 1))
  assert flops.function_flops(grad, x, ws) == 3 * forward
  # Rematerialisation recomputes the forward pass inside the backward one.
  assert flops.function_flops(jax.grad(jax.checkpoint(scanned), argnums=(0, 1)), x, ws) == (
    4 * forward
  )


def test_cond_counts_its_most_expensive_branch():
  x = jax.ShapeDtypeStruct((8, 8), jnp.float32)

  def f(p, x):
    return jax.lax.cond(p, lambda x: x @ x @ x, lambda x: x @ x, x)

  assert flops.function_flops(f, jax.ShapeDtypeStruct((), jnp.bool_), x) == 2 * (2 * 8**3)


@pytest.fixture(scope='module')
def tiny_steps():
  """{scan_layers: (flops from the jaxpr, XLA's cost-analysis flops or None)} for the tiny train
  step; only the unrolled step is compiled (XLA's count of a scanned one is what is wrong)."""
  out = {}
  for scan in (False, True):
    cfg, objective, tx, schedule, mesh, _, batch = train_helpers.setup(
      overrides=[f'model.scan_layers={scan}']  # depth 2: a scan of two blocks
    )
    rules = cfg.logical_axis_rules
    _, shardings = state_lib.state_shardings(objective, tx, mesh, rules)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)
    traced = step_lib.trace_step(
      objective, tx, schedule, cfg.optimizer, mesh, rules, shardings, abstract
    )
    xla = None
    if not scan:
      compiled, _ = step_lib.compile_traced(traced, mesh, rules)
      xla = compiled.cost_analysis()['flops']
    out[scan] = flops.jaxpr_flops(traced.jaxpr), xla
  return out


@pytest.mark.slow
def test_train_step_flops_do_not_depend_on_the_block_layout(tiny_steps):
  assert tiny_steps[True][0] == tiny_steps[False][0] > 0


@pytest.mark.slow
def test_train_step_flops_are_xlas_count_without_the_elementwise_work(tiny_steps):
  counted, xla = tiny_steps[False]  # unrolled: XLA's analysis sees every block
  assert 0.9 * xla < counted <= xla
