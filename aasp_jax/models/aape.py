"""AaPE: the aliasing-aware patch embedding (design doc section 3).

A stride-16 patchifier can only represent temporal modulation below pi/16 rad/frame (3.125 Hz at
100 frames/s); faster modulation of a mel band aliases into, or vanishes from, its tokens. AaPE
keeps the standard conv stem and adds, per patch, features of the alias-prone band
(pi/patch_t, pi]:

1. the standard stem (`ConvPatchStem`, submodule 'conv_stem');
2. subbands: each mel bin's time series; G = F / patch_f groups of patch_f bins share parameters;
3. a Lambda encoder estimates, per clip, group and mode, a decay alpha and a frequency omega
   (or learns them input-independently in 'fixed' mode);
4. SBLU kernels (`sblu.sblu_kernel`) with complex per-mode mixing B (in) and C (out), as in S4D;
5. a per-example depthwise 'same' convolution along time -> complex y [B, T, F, N];
6. the envelope log1p(|y|), average-pooled over the patch's frames -> [B, T/pt, F/pf, patch_f N]
   -> a linear projection to D;
7. fusion with the conv tokens: a per-channel gate initialised at 0 (so AaPE starts exactly as the
   plain stem), or a concat + linear layer.

The AaPE branch is computed in float32/complex64 whatever `dtype` is: it is cheap next to the
encoder, and FFTs and complex arithmetic do not work well in bf16.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aasp_jax.models.conv_stem import ConvPatchStem
from aasp_jax.models.conv_stem import check_patch_grid
from aasp_jax.models.sblu import PHASES
from aasp_jax.models.sblu import WINDOWS
from aasp_jax.models.sblu import check_kernel_size
from aasp_jax.models.sblu import check_option
from aasp_jax.models.sblu import constrain_lambda
from aasp_jax.models.sblu import depthwise_conv_same
from aasp_jax.models.sblu import frequency_response
from aasp_jax.models.sblu import lambda_bounds
from aasp_jax.models.sblu import modulation_pooling_matrix
from aasp_jax.models.sblu import sblu_kernel
from aasp_jax.models.sblu import unconstrain_lambda

__all__ = [
  'AaPE',
  'FUSIONS',
  'LAMBDA_MODES',
  'LambdaEncoder',
  'PHASES',
  'WINDOWS',
  'constrain_lambda',
  'depthwise_conv_same',
  'frequency_response',
  'initial_lambda',
  'lambda_bounds',
  'modulation_pooling_matrix',
  'sblu_kernel',
  'unconstrain_lambda',
]

LAMBDA_MODES = ('adaptive', 'fixed')
FUSIONS = ('gate', 'concat')

# The Lambda encoder's log-magnitude floor, relative to a per-frame amplitude (the rFFT is divided
# by T); it keeps log() finite for silent or constant inputs.
_LOG_FLOOR = 1e-6
# The floor relative to the level of white noise with the group's power (rms / sqrt(T)): 1e-2 puts
# it 40 dB below that level. A bin that is zero in exact arithmetic (a periodic or constant series)
# is float32 rounding noise, ~1e-7 of that level, whose value depends on the order of the DFT's
# sums (JAX's rFFT, a matmul DFT in torch or ONNX); above this floor its log differs by ~1e-5
# between them instead of by O(1). 0 is the floor of checkpoints saved before the field existed.
SPECTRUM_FLOOR = 1e-2


def initial_lambda(num_modes: int, kernel_size: int, patch_t: int, delta: float = 1.0):
  """The (alpha [N], omega [N]) every group starts from, as float64 numpy arrays.

  The N frequencies sit at the centres of N equal slices of the alias band, and every mode starts
  with alpha = alpha_min + spacing / 2 (spacing = the slice width). A two-sided Laplace window's
  -3 dB full width is about 1.3 alpha, so neighbouring modes overlap and every frequency of the band
  is covered at init, while the narrowest admissible window (alpha_min) stays reachable.
  """
  alpha_min, omega_low, omega_high = lambda_bounds(kernel_size, patch_t, delta)
  spacing = (omega_high - omega_low) / num_modes
  omega = omega_low + spacing * (np.arange(num_modes) + 0.5)
  alpha = np.full(num_modes, alpha_min + spacing / 2)
  return alpha, omega


def _constant_init(value):
  """An initializer that broadcasts a fixed numpy array to the requested shape."""

  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.broadcast_to(jnp.asarray(value, dtype), shape)

  return init


def _concat_fusion_init(key, shape, dtype=jnp.float32):
  """[conv; features] -> D kernel that starts as [I; 0]: concat fusion also starts as the stem."""
  del key
  num_in, num_out = shape
  return jnp.concatenate(
    [jnp.eye(num_out, dtype=dtype), jnp.zeros((num_in - num_out, num_out), dtype)], axis=0
  )


class LambdaEncoder(nn.Module):
  """Estimates the SBLU parameters: log-mel [B, T, F] -> (alpha [B, G, N], omega [B, G, N]).

  'adaptive': per clip and group, the group's mean time series -> rFFT over time -> log-magnitude
  -> pooled into `num_mod_bands` bands -> LayerNorm -> MLP shared across groups (plus a learned
  group embedding) -> 2N raw outputs -> `sblu.constrain_lambda`. 'fixed': 2N raw values per group,
  learned but not input-dependent (an ablation). Both start from `initial_lambda`: the adaptive
  encoder's output layer has zero weights and those values as bias.
  """

  num_modes: int = 8
  kernel_size: int = 31
  patch_t: int = 16
  patch_f: int = 16
  lambda_mode: str = 'adaptive'
  num_mod_bands: int = 32
  lambda_hidden: int = 64
  init_delta: float = 1.0
  spectrum_floor: float = SPECTRUM_FLOOR
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_option('LambdaEncoder.lambda_mode', self.lambda_mode, LAMBDA_MODES)
    check_kernel_size(self.kernel_size)
    super().__post_init__()

  @nn.compact
  def __call__(self, x_btf, delta=1.0):
    batch, num_t, num_f = x_btf.shape
    if num_f % self.patch_f:
      raise ValueError(f'F={num_f} is not a multiple of patch_f={self.patch_f}.')
    num_g, num_n = num_f // self.patch_f, self.num_modes
    alpha0, omega0 = initial_lambda(num_n, self.kernel_size, self.patch_t, self.init_delta)
    z_alpha0, z_omega0 = unconstrain_lambda(
      alpha0, omega0, self.kernel_size, self.patch_t, self.init_delta
    )

    if self.lambda_mode == 'fixed':
      z_alpha_gn = self.param(
        'z_alpha',
        nn.with_logical_partitioning(_constant_init(z_alpha0), (None, None)),
        (num_g, num_n),
        self.param_dtype,
      )
      z_omega_gn = self.param(
        'z_omega',
        nn.with_logical_partitioning(_constant_init(z_omega0), (None, None)),
        (num_g, num_n),
        self.param_dtype,
      )
      z_alpha = jnp.broadcast_to(z_alpha_gn, (batch, num_g, num_n))
      z_omega = jnp.broadcast_to(z_omega_gn, (batch, num_g, num_n))
      return constrain_lambda(z_alpha, z_omega, self.kernel_size, self.patch_t, delta)

    u_btg = x_btf.astype(jnp.float32).reshape(batch, num_t, num_g, self.patch_f).mean(-1)
    # The mean is removed after the first frame, the same in exact arithmetic; a constant series
    # becomes exactly zero in any float order.
    u_btg = u_btg - u_btg[:, :1]
    u_btg = u_btg - u_btg.mean(axis=1, keepdims=True)
    spec_bkg = jnp.fft.rfft(u_btg, axis=1)[:, 1 : num_t // 2 + 1] / num_t
    white_b1g = jnp.sqrt(jnp.mean(u_btg * u_btg, axis=1, keepdims=True) / num_t)
    floor_b1g = _LOG_FLOOR + self.spectrum_floor * white_b1g
    # log(|X| + floor) - log(floor): the same after the LayerNorm below (a shift per clip and
    # group, and the pooling's columns sum to 1), but exactly 0 where |X| is, so a constant series
    # gives exactly 0 in every band instead of float32 noise that the LayerNorm would blow up.
    logmag_bkg = jnp.log1p(jnp.abs(spec_bkg) / floor_b1g)
    pool_kc = jnp.asarray(modulation_pooling_matrix(num_t, self.num_mod_bands))
    h_bgc = jnp.einsum('bkg,kc->bgc', logmag_bkg, pool_kc, precision=jax.lax.Precision.HIGHEST)
    # Normalising across bands removes the clip's gain (an additive log offset) and bounds the MLP
    # input for any input scale, so the outputs cannot be pushed far into saturation by loud,
    # silent or constant clips.
    h_bgc = nn.LayerNorm(
      dtype=jnp.float32,
      param_dtype=self.param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (None,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
      name='norm',
    )(h_bgc)
    h_bgh = nn.Dense(
      self.lambda_hidden,
      dtype=jnp.float32,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
      name='hidden',
    )(h_bgc)
    group_gh = self.param(
      'group_embedding',
      nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None)),
      (num_g, self.lambda_hidden),
      self.param_dtype,
    )
    h_bgh = nn.gelu(h_bgh + group_gh.astype(jnp.float32))
    z_bgo = nn.Dense(
      2 * num_n,
      dtype=jnp.float32,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, None)),
      bias_init=nn.with_logical_partitioning(
        _constant_init(np.concatenate([z_alpha0, z_omega0])), (None,)
      ),
      name='out',
    )(h_bgh)
    return constrain_lambda(
      z_bgo[..., :num_n], z_bgo[..., num_n:], self.kernel_size, self.patch_t, delta
    )


class AaPE(nn.Module):
  """Aliasing-aware patch embedding: log-mel [B, T, F] -> tokens [B, T // pt, F // pf, D].

  Attributes:
    embed_dim: token width D.
    patch_t: patch size (= stride) along time.
    patch_f: patch size along frequency; also the size of a parameter-sharing group of bins.
    num_modes: N, SBLU modes (frequencies) per group.
    kernel_size: K, the odd SBLU kernel length.
    window: 'two_sided' (the paper's) or 'one_sided' (causal, SSM-style).
    phase: 'analytic' (exp(i omega m)) or 'literal' (exp(i omega |m|), as quoted by the review).
    lambda_mode: 'adaptive' (estimated per clip) or 'fixed' (learned, input-independent).
    fusion: 'gate' (conv + g * proj(features), g = 0 at init) or 'concat' (linear on the concat).
    delta: the SBLU step size Delta (> 0).
    learn_delta: learn Delta (log-parameterised so it stays positive).
    num_mod_bands: bands of the Lambda encoder's modulation spectrum.
    lambda_hidden: width of the Lambda encoder's MLP.
    dtype: compute dtype of the conv stem and of the output tokens.
    param_dtype: parameter dtype.

  Intermediates sown (collection 'intermediates'): 'alpha' and 'omega' [B, G, N] (the values passed
  to `sblu_kernel`; Delta * omega is in rad/frame), and 'features' [B, T // pt, G, pf * N] (the
  pooled envelope, before the projection to D).
  """

  embed_dim: int
  patch_t: int = 16
  patch_f: int = 16
  num_modes: int = 8
  kernel_size: int = 31
  window: str = 'two_sided'
  phase: str = 'analytic'
  lambda_mode: str = 'adaptive'
  fusion: str = 'gate'
  delta: float = 1.0
  learn_delta: bool = False
  num_mod_bands: int = 32
  lambda_hidden: int = 64
  spectrum_floor: float = SPECTRUM_FLOOR  # LambdaEncoder's log-magnitude floor (see there)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    # Fail when the model is built, not deep inside a jitted trace.
    for name, valid in (
      ('window', WINDOWS),
      ('phase', PHASES),
      ('lambda_mode', LAMBDA_MODES),
      ('fusion', FUSIONS),
    ):
      check_option(f'AaPE.{name}', getattr(self, name), valid)
    check_kernel_size(self.kernel_size)
    if not self.delta > 0:
      raise ValueError(f'AaPE.delta must be positive; got {self.delta}.')
    if self.num_modes < 1:
      raise ValueError(f'AaPE.num_modes must be at least 1; got {self.num_modes}.')
    super().__post_init__()

  @nn.compact
  def __call__(self, x_btf):
    if x_btf.ndim != 3:
      raise ValueError(f'expected a log-mel batch [B, T, F]; got shape {x_btf.shape}.')
    batch, num_t, num_f = x_btf.shape
    check_patch_grid(num_t, num_f, self.patch_t, self.patch_f)
    num_g, num_n = num_f // self.patch_f, self.num_modes

    conv_btgd = ConvPatchStem(
      embed_dim=self.embed_dim,
      patch_t=self.patch_t,
      patch_f=self.patch_f,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name='conv_stem',
    )(x_btf)

    if self.learn_delta:
      log_delta = self.param(
        'log_delta',
        nn.with_logical_partitioning(_constant_init(math.log(self.delta)), ()),
        (),
        self.param_dtype,
      )
      delta = jnp.exp(log_delta.astype(jnp.float32))
    else:
      delta = self.delta

    alpha_bgn, omega_bgn = LambdaEncoder(
      num_modes=num_n,
      kernel_size=self.kernel_size,
      patch_t=self.patch_t,
      patch_f=self.patch_f,
      lambda_mode=self.lambda_mode,
      num_mod_bands=self.num_mod_bands,
      lambda_hidden=self.lambda_hidden,
      init_delta=self.delta,
      spectrum_floor=self.spectrum_floor,
      param_dtype=self.param_dtype,
      name='lambda_encoder',
    )(x_btf, delta)
    self.sow('intermediates', 'alpha', alpha_bgn)
    self.sow('intermediates', 'omega', omega_bgn)

    h_bgnk = sblu_kernel(alpha_bgn, omega_bgn, self.kernel_size, delta, self.window, self.phase)
    # S4D-style complex input/output mixing per (group, mode), stored as (real, imag) pairs.
    mix_init = nn.with_logical_partitioning(
      _constant_init(np.array([1.0, 0.0])), (None, None, None)
    )
    mix_in = self.param('mix_in', mix_init, (num_g, num_n, 2), self.param_dtype)
    mix_out = self.param('mix_out', mix_init, (num_g, num_n, 2), self.param_dtype)
    mix_in = jax.lax.complex(mix_in[..., 0], mix_in[..., 1]).astype(jnp.complex64)
    mix_out = jax.lax.complex(mix_out[..., 0], mix_out[..., 1]).astype(jnp.complex64)
    h_bgnk = h_bgnk * (mix_out * mix_in)[None, :, :, None]

    # Each subband's clip mean is removed before the band-pass: log-mel levels are large next to
    # their modulation, the Laplace window's spectrum has slowly decaying (Lorentzian) tails, and
    # the 'same' zero padding would turn the level into edge steps; all of these would leak level
    # into the envelope. The level itself is what the conv tokens carry.
    u_btf = x_btf.astype(jnp.float32)
    u_btf = u_btf - u_btf.mean(axis=1, keepdims=True)
    y_btfn = depthwise_conv_same(u_btf, h_bgnk)

    # The envelope is phase-insensitive, so it survives pooling (pooling the complex output of a
    # band-pass over a patch would cancel it out).
    env_btfn = jnp.log1p(jnp.abs(y_btfn))
    num_tokens_t = num_t // self.patch_t
    feat_btgc = env_btfn.reshape(batch, num_tokens_t, self.patch_t, num_g, self.patch_f * num_n)
    feat_btgc = feat_btgc.mean(axis=2)
    self.sow('intermediates', 'features', feat_btgc)
    feat_btgd = nn.Dense(
      self.embed_dim,
      dtype=jnp.float32,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, 'embed')),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)),
      name='feature_proj',
    )(feat_btgc)

    conv_btgd = conv_btgd.astype(jnp.float32)
    if self.fusion == 'gate':
      gate_d = self.param(
        'gate',
        nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)),
        (self.embed_dim,),
        self.param_dtype,
      )
      # conv + 0 * finite is bit-exact conv, so at init AaPE is the plain stem.
      tokens_btgd = conv_btgd + gate_d.astype(jnp.float32) * feat_btgd
    else:
      tokens_btgd = nn.Dense(
        self.embed_dim,
        dtype=jnp.float32,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(_concat_fusion_init, (None, 'embed')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)),
        name='fusion_proj',
      )(jnp.concatenate([conv_btgd, feat_btgd], axis=-1))
    tokens_btgd = tokens_btgd.astype(self.dtype)
    return nn.with_logical_constraint(tokens_btgd, ('batch', None, None, 'embed'))
