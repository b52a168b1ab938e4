"""FLOPs of a traced step, counted from its jaxpr: matrix multiplies and convolutions.

XLA's cost analysis counts the body of a while loop once, so a model whose blocks run under
`nn.scan` (`model.scan_layers`) would report one block's FLOPs instead of `depth` blocks'. Counting
the jaxpr instead multiplies every scan body by its length, and it counts the work the program
asks for (the model FLOPs that MFU figures use), whatever XLA later fuses or partitions.

Only dot_general and conv_general_dilated are counted: elementwise work (softmax, norms, GELU) is a
few percent of a transformer step and is left out, as in the usual 6 * params * tokens estimate.
"""

import math

import jax
from jax.extend import core as jex_core


def dot_general_flops(eqn) -> int:
  """2 * output elements * contracted elements (one multiply and one add per product)."""
  lhs = eqn.invars[0].aval
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  contracted = math.prod(lhs.shape[d] for d in lhs_contract)
  return 2 * math.prod(eqn.outvars[0].aval.shape) * contracted


def conv_flops(eqn) -> int:
  """2 * output elements * (kernel elements per output feature): the kernel's input-feature dim
  already holds in_features / feature_group_count."""
  rhs = eqn.invars[1].aval
  out_feature_dim = eqn.params['dimension_numbers'].rhs_spec[0]
  per_output = math.prod(rhs.shape) // rhs.shape[out_feature_dim]
  return 2 * math.prod(eqn.outvars[0].aval.shape) * per_output


COUNTERS = {'dot_general': dot_general_flops, 'conv_general_dilated': conv_flops}


def _sub_jaxprs(value):
  if isinstance(value, jex_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jex_core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def jaxpr_flops(jaxpr) -> int:
  """FLOPs of one execution of `jaxpr` (a Jaxpr or ClosedJaxpr), nested calls included.

  scan bodies count `length` times; of a cond's branches the most expensive counts; a while
  loop's trip count is unknown before it runs, so its body counts once (the train step has none).
  """
  if isinstance(jaxpr, jex_core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in COUNTERS:
      total += COUNTERS[name](eqn)
      continue
    if name == 'cond':
      total += max(jaxpr_flops(b) for b in eqn.params['branches'])
      continue
    if name == 'while':
      total += jaxpr_flops(eqn.params['body_jaxpr'])
      continue
    inner = sum(jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
    total += inner * (eqn.params['length'] if name == 'scan' else 1)
  return total


def function_flops(fn, *args, **kwargs) -> int:
  """FLOPs of `fn(*args, **kwargs)`; args may be arrays or jax.ShapeDtypeStruct (nothing runs)."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))
