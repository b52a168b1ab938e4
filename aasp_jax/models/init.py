"""Parameter initialisation schemes (`model.init`), applied to a freshly initialised parameter tree.

'aasp' keeps the modules' own initialisers (xavier-uniform Dense kernels, zero biases, CLS
N(0, 0.02), the MAE patch-projection init). 'eat' redraws what EAT's pre-training draws
(cwx-worst-one/EAT 06c1c34, fairseq 3d262bb2):
  * every Linear outside the patch stem: weight N(0, 0.02), bias 0 (init_bert_params, applied by
    Data2VecMultiModel.__init__, models/EAT_pretraining.py:243-248;
    fairseq/modules/transformer_sentence_encoder.py init_bert_params);
  * the CLS (extra) token: N(0, 1) (init_extra_token_zero: false, models/base.py:110-115);
  * the patch-embedding convolution: xavier-uniform on the kernel viewed as [D, patch pixels]
    (models/images.py:96-98; already the 'aasp' init) and torch's default bias,
    U(-1/sqrt(fan_in), 1/sqrt(fan_in));
  * the CNN decoder: torch's default Conv2d and Linear init, weight and bias both
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (init_bert_params leaves convolutions alone and
    DecoderBase.reset_parameters, models/modules.py:106-109, resets the output Linear);
  * LayerNorms: weight 1, bias 0 (as here).
AaSP's own additions (AaPE's branch, whose gate starts at 0) keep their initialisers under 'eat'.

The function maps a boxed tree (logical-axis metadata kept) and is jittable, so a sharded state is
still born on its devices.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

INITS = ('aasp', 'eat')
BERT_STD = 0.02


def _key_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def eat_init(params: dict, rng: jax.Array) -> dict:
  """Returns `params` ({'encoder', 'predictor', 'projection'}, boxed or not) redrawn as EAT does.

  Scanned encoders store blocks stacked on a leading 'layers' axis; the draws are per element, so
  the layout does not matter.
  """
  plain = nn.meta.unbox(params)
  cnn = any(name.startswith('conv_') for name in plain.get('predictor', {}))
  leaves = jax.tree_util.tree_flatten_with_path(plain)[0]
  keys = dict(zip([_key_names(p) for p, _ in leaves], jax.random.split(rng, len(leaves))))

  def fan_in_of(names):
    """fan_in of the kernel a leaf belongs to (a bias shares its kernel's)."""
    node = plain
    for name in names[:-1]:
      node = node[name]
    kernel = node['kernel']
    stacked = 'blocks' in names  # scanned layers: the leading axis is the layer
    shape = kernel.shape[1:] if stacked else kernel.shape
    return math.prod(shape[:-1])

  def redraw(path, leaf):
    names = _key_names(path)
    value = leaf.value if isinstance(leaf, nn.meta.AxisMetadata) else leaf
    new = value
    key = keys[names]
    top, last = names[0], names[-1]
    in_stem = 'stem' in names
    if top == 'encoder' and last == 'cls':
      new = jax.random.normal(key, value.shape, jnp.float32)
    elif in_stem and names[-2:] == ('proj', 'bias'):
      bound = 1.0 / math.sqrt(fan_in_of(names))
      new = jax.random.uniform(key, value.shape, jnp.float32, -bound, bound)
    elif cnn and top == 'predictor' and _is_cnn_decoder_leaf(names) and last in ('kernel', 'bias'):
      bound = 1.0 / math.sqrt(fan_in_of(names))
      new = jax.random.uniform(key, value.shape, jnp.float32, -bound, bound)
    elif not in_stem and last == 'kernel' and _is_dense(names):
      new = BERT_STD * jax.random.normal(key, value.shape, jnp.float32)
    elif not in_stem and last == 'bias' and _is_dense(names):
      new = jnp.zeros(value.shape, jnp.float32)
    new = new.astype(value.dtype)
    return leaf.replace_boxed(new) if isinstance(leaf, nn.meta.AxisMetadata) else new

  return jax.tree_util.tree_map_with_path(
    redraw, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)
  )


def _is_cnn_decoder_leaf(names: tuple[str, ...]) -> bool:
  """The CNN decoder's convolutions and output projection (its in_proj is AaSP's, a Dense)."""
  return any(n.startswith('conv_') for n in names) or 'out_proj' in names


def _is_dense(names: tuple[str, ...]) -> bool:
  """A Dense layer's kernel or bias (not a LayerNorm's, not a token or a convolution)."""
  module = names[-2] if len(names) > 1 else ''
  if 'norm' in module or module.startswith('conv'):
    return False
  return names[-1] in ('kernel', 'bias')


def apply_init(kind: str, params: dict, rng: jax.Array) -> dict:
  """`params` under the named scheme ('aasp' returns them unchanged)."""
  if kind not in INITS:
    raise ValueError(f'model.init={kind!r} is not valid; choose one of {INITS}.')
  return params if kind == 'aasp' else eat_init(params, rng)
