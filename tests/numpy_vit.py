"""An independent numpy forward pass of the ViT encoder blocks, written from the math (pre-LN
transformer, exact GELU), used as the reference in tests. It reads the Flax parameter tree but shares
no code with aasp_jax."""

import numpy as np
from scipy.special import erf


def layer_norm(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p['scale'] + p['bias']


def gelu(x):
  return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def dense_general(x, p):
  """x [..., d_in] @ kernel [d_in, d_out] + bias."""
  return x @ np.asarray(p['kernel'], np.float64) + p['bias']


def attention(x_q, x_kv, p, num_heads, mask=None):
  def heads(y):
    return y.reshape(*y.shape[:-1], num_heads, y.shape[-1] // num_heads)

  q = heads(dense_general(x_q, p['query']))
  k = heads(dense_general(x_kv, p['key']))
  v = heads(dense_general(x_kv, p['value']))
  logits = np.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask, logits, -1e30)
  logits = logits - logits.max(-1, keepdims=True)
  w = np.exp(logits)
  w = w / w.sum(-1, keepdims=True)
  out = np.einsum('bhqs,bshk->bqhk', w, v)
  return dense_general(out.reshape(*out.shape[:-2], -1), p['out'])


def block(x, p, num_heads, mask=None):
  x = x + attention(
    layer_norm(x, p['norm1']), layer_norm(x, p['norm1']), p['attn'], num_heads, mask
  )
  h = layer_norm(x, p['norm2'])
  h = gelu(dense_general(h, p['mlp']['fc1']))
  return x + dense_general(h, p['mlp']['fc2'])


def encode_tokens(tokens_bnd, params, depth, valid_bn=None, num_heads=4):
  """CLS + blocks + final norm, given position-embedded tokens. Returns (cls, tokens)."""
  params = to_numpy(params)
  b, _, d = tokens_bnd.shape
  x = np.concatenate([np.broadcast_to(params['cls'], (b, 1, d)), tokens_bnd], axis=1)
  mask = None
  if valid_bn is not None:
    valid = np.concatenate([np.ones((b, 1), bool), valid_bn], axis=1)
    mask = valid[:, None, None, :]
  for i in range(depth):
    x = block(x, params[f'blocks_{i}'], num_heads, mask)
  x = layer_norm(x, params['norm'])
  return x[:, 0], x[:, 1:]


def to_numpy(tree):
  if isinstance(tree, dict):
    return {k: to_numpy(v) for k, v in tree.items()}
  return np.asarray(getattr(tree, 'value', tree), np.float64)
