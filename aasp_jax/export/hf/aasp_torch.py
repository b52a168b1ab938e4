"""An AaSP audio encoder in PyTorch, front end included: torch, numpy and safetensors only.

This file is copied verbatim into every aasp-jax export folder, so the folder runs where neither
JAX nor aasp-jax is installed:

  import sys; sys.path.insert(0, 'exports/quickstart')
  import aasp_torch
  model = aasp_torch.AaSPEncoder.from_pretrained('exports/quickstart')  # eval mode, float32, CPU
  out = model.embed(waveforms_bs, num_samples_b)   # 'scene' [B, 2D], 'frames' [B, T', F' D], ...
  x_btf = model.features(waveforms_bs)             # normalised log-mel of the first window
  tokens = model(x_btf)['tokens']                  # [B, patches, D]
  classifier = aasp_torch.AaSPClassifier.from_pretrained(folder)  # a fine-tuned export
  logits = classifier.predict(waveforms_bs, num_samples_b)         # [B, labels]

It mirrors, operation for operation, the JAX definitions of aasp-jax it reproduces (its tests hold
them to a relative error below 1e-4, ~1e-6 in practice):

- front end: aasp_jax/audio/mel.py, fbank_host.py, fbank_device.py (Kaldi framing with
  snip_edges, per-frame DC removal, pre-emphasis, window, power spectrum, Kaldi mel banks, log
  floor, pad/crop to target_length with 0 in the log domain, normalisation);
- stems: aasp_jax/models/conv_stem.py and aape.py / sblu.py (Lambda encoder, SBLU kernels,
  per-example depthwise convolution, envelope, pooling, projection, gate or concat fusion);
- encoder: posemb.py (fixed 2-D sin-cos, time or frequency first, or a learned table),
  attention.py and vit.py (pre- or post-LN blocks, padded tokens masked as attention keys);
- pooling: aasp_jax/evaluate/embed.py's Embedder with its defaults (windows of target_length
  frames without overlap, scene pooling 'cls_mean', timestamp pooling 'concat').

The front end computes the spectrum in float64, as the host path does (in float32, bins just above
the log floor of loud frames would be off by ~1e-3 in the log). Complex values are carried as
(real, imag) pairs, so the module holds only real tensors. Every constant table (front-end
matrices, position tables) is a non-persistent buffer recomputed by `reset_constants`, and the
tables that depend on the input length are sliced or computed from its (possibly symbolic) size,
so the encoder traces to ONNX with a dynamic time axis.

Weights: model.safetensors holds this module's state dict under 'encoder.' (and a classifier's
'classifier.weight' / 'classifier.bias'); config.json's 'model' section is the architecture,
'frontend' the front-end preset, 'tensors' every tensor's shape.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import safetensors
import safetensors.numpy
import torch
import torch.nn.functional as F
from torch import nn

FORMAT = 'aasp-jax-export'
FORMAT_VERSION = 2
LAYOUT = 'pytorch'
WEIGHTS = 'model.safetensors'
CONFIG = 'config.json'
PREPROCESSOR = 'preprocessor_config.json'
ENCODER_PREFIX = 'encoder.'
HEAD_PREFIX = 'classifier.'

# The config fields this rebuild reads, and those that do not change the function it computes
# (precision, memory and kernel choices of the JAX run, how the weights were first drawn; the
# predictor is not part of the encoder).
_MODEL_FIELDS = frozenset(
  'variant width depth num_heads mlp_dim patch_t patch_f stem aape max_time_patches posemb '
  'block_norm norm_eps drop_path dtype param_dtype remat scan_layers attention_impl '
  'predictor init'.split()
)
_MODEL_CHOICES = {
  'stem': ('conv', 'aape'),
  'posemb': ('sincos', 'sincos_mae', 'learned'),
  'block_norm': ('pre', 'post'),
}
# Fields older exports do not have: these defaults are what those models computed.
_MODEL_DEFAULTS = {'posemb': 'sincos', 'block_norm': 'pre', 'norm_eps': 1e-6}
_AAPE_FIELDS = frozenset(
  'num_modes kernel_size window phase lambda_mode fusion delta learn_delta '
  'num_mod_bands lambda_hidden spectrum_floor'.split()
)
_AAPE_CHOICES = {
  'window': ('two_sided', 'one_sided'),
  'phase': ('analytic', 'literal'),
  'lambda_mode': ('adaptive', 'fixed'),
  'fusion': ('gate', 'concat'),
}
_PRESET_FIELDS = frozenset(
  'name sample_rate frame_length_ms frame_shift_ms round_to_power_of_two '
  'num_mel_bins low_freq high_freq preemphasis remove_dc_offset window log_floor '
  'subtract_waveform_mean waveform_scale target_length norm_mean norm_std norm_mode'.split()
)
_WINDOWS = ('hann_symmetric', 'hann_periodic', 'hamming', 'povey')
_NORM_MODES = ('audioset_2std', 'std')


class ExportFormatError(ValueError):
  """A file of an export folder is missing a field, corrupted or disagrees with the config."""


def _unsupported(field: str, value, supported) -> ValueError:
  return ValueError(
    f'{field}={value!r} is not supported by the PyTorch rebuild (aasp_torch); it supports '
    f'{supported}. Re-export a model with a supported setting or port the option.'
  )


def model_options(model: dict) -> dict:
  """The config's `model` section with the defaults of fields older exports lack."""
  return {**_MODEL_DEFAULTS, **model}


def check_model_config(model: dict) -> None:
  """Raises ValueError naming the field for any model option this rebuild does not implement."""
  for key in sorted(set(model) - _MODEL_FIELDS):
    raise _unsupported(f'model.{key}', model[key], f'only the fields {sorted(_MODEL_FIELDS)}')
  model = model_options(model)
  if model.get('scan_layers'):
    raise _unsupported('model.scan_layers', True, 'the unrolled layout (False)')
  for key, choices in _MODEL_CHOICES.items():
    if model[key] not in choices:
      raise _unsupported(f'model.{key}', model[key], choices)
  if not model['norm_eps'] > 0:
    raise _unsupported('model.norm_eps', model['norm_eps'], 'positive values')
  if model['stem'] == 'aape':
    aape = model['aape']
    for key in sorted(set(aape) - _AAPE_FIELDS):
      raise _unsupported(f'model.aape.{key}', aape[key], f'only the fields {sorted(_AAPE_FIELDS)}')
    for key, choices in _AAPE_CHOICES.items():
      if aape[key] not in choices:
        raise _unsupported(f'model.aape.{key}', aape[key], choices)
    if aape['kernel_size'] < 1 or aape['kernel_size'] % 2 != 1:
      raise _unsupported('model.aape.kernel_size', aape['kernel_size'], 'positive odd sizes')
    if not aape['delta'] > 0:
      raise _unsupported('model.aape.delta', aape['delta'], 'positive values')


def check_preset(preset: dict) -> None:
  """Raises ValueError naming the field for any front-end option this rebuild does not implement."""
  for key in sorted(set(preset) - _PRESET_FIELDS):
    raise _unsupported(f'frontend.{key}', preset[key], f'only the fields {sorted(_PRESET_FIELDS)}')
  for key in sorted(_PRESET_FIELDS - set(preset)):
    raise ValueError(f'the front-end preset has no field {key!r}.')
  if preset['window'] not in _WINDOWS:
    raise _unsupported('frontend.window', preset['window'], _WINDOWS)
  if preset['norm_mode'] not in _NORM_MODES:
    raise _unsupported('frontend.norm_mode', preset['norm_mode'], _NORM_MODES)


# ----------------------------------------------------------------------------------------------
# Front end (aasp_jax/audio/mel.py, fbank_host.py, fbank_device.py)
# ----------------------------------------------------------------------------------------------


class FrontEndOptions:
  """The preset's derived sizes, computed as aasp_jax.audio.presets.FrontEndPreset does (Kaldi's
  truncation, not rounding)."""

  def __init__(self, preset: dict):
    check_preset(preset)
    self.preset = dict(preset)
    p = preset
    self.sample_rate = int(p['sample_rate'])
    self.window_length = int(p['sample_rate'] * p['frame_length_ms'] * 0.001)
    self.frame_shift = int(p['sample_rate'] * p['frame_shift_ms'] * 0.001)
    n = self.window_length
    self.n_fft = 1 << (n - 1).bit_length() if p['round_to_power_of_two'] else n
    hf = p['high_freq']
    self.high_freq_hz = hf if hf > 0 else 0.5 * p['sample_rate'] + hf
    self.norm_scale = 2.0 * p['norm_std'] if p['norm_mode'] == 'audioset_2std' else p['norm_std']
    self.num_mel_bins = int(p['num_mel_bins'])
    self.target_length = int(p['target_length'])

  def num_frames(self, num_samples: int) -> int:
    """Frames with snip_edges=True: 1 + (S - window) // shift, or 0 if S < window."""
    if num_samples < self.window_length:
      return 0
    return 1 + (num_samples - self.window_length) // self.frame_shift

  @property
  def window_samples(self) -> int:
    """Samples of one encoder window: exactly target_length frames."""
    return self.window_length + (self.target_length - 1) * self.frame_shift


def analysis_window(opts: FrontEndOptions) -> np.ndarray:
  """float64 [window_length] (mel.window): Kaldi's symmetric windows use 2 pi / (N - 1)."""
  n, name = opts.window_length, opts.preset['window']
  i = np.arange(n, dtype=np.float64)
  cos_sym = np.cos(2.0 * np.pi * i / (n - 1))
  if name == 'hann_symmetric':
    return 0.5 - 0.5 * cos_sym
  if name == 'hann_periodic':
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * i / n)
  if name == 'hamming':
    return 0.54 - 0.46 * cos_sym
  return (0.5 - 0.5 * cos_sym) ** 0.85  # 'povey'


def _kaldi_mel(freq_hz):
  return 1127.0 * np.log1p(np.asarray(freq_hz, dtype=np.float64) / 700.0)


def mel_banks(opts: FrontEndOptions) -> np.ndarray:
  """float64 [n_fft // 2, num_mel_bins] (mel.mel_banks without its all-zero Nyquist row): Kaldi's
  triangles, linear in mel, sampled at the FFT bin centres."""
  p = opts.preset
  mel_low, mel_high = _kaldi_mel(p['low_freq']), _kaldi_mel(opts.high_freq_hz)
  mel_delta = (mel_high - mel_low) / (opts.num_mel_bins + 1)
  m = np.arange(opts.num_mel_bins, dtype=np.float64)[None, :]
  left, center, right = (mel_low + (m + k) * mel_delta for k in (0.0, 1.0, 2.0))
  bin_mel = _kaldi_mel(np.arange(opts.n_fft // 2) * (opts.sample_rate / opts.n_fft))[:, None]
  up = (bin_mel - left) / (center - left)
  down = (right - bin_mel) / (right - center)
  return np.maximum(0.0, np.minimum(up, down))


def frame_spectrum_matrix(opts: FrontEndOptions) -> np.ndarray:
  """float64 [window_length, 2 (n_fft // 2)] (mel.frame_spectrum_matrix): DC removal, pre-emphasis,
  window, zero-padding and the DFT are linear in a frame's samples, so one matrix maps a frame to
  [Re X_0 .. Re X_{K-1}, Im X_0 .. Im X_{K-1}]. Row j is a unit impulse at j pushed through them."""
  p = opts.preset
  frames = np.eye(opts.window_length)
  if p['remove_dc_offset']:
    frames = frames - frames.mean(axis=1, keepdims=True)
  c = p['preemphasis']
  if c:
    # Kaldi: x[i] -= c x[i-1] for i > 0, and the first sample against itself.
    frames = np.concatenate([frames[:, :1] * (1.0 - c), frames[:, 1:] - c * frames[:, :-1]], 1)
  frames = frames * analysis_window(opts)
  spectrum = np.fft.rfft(frames, n=opts.n_fft, axis=1)[:, : opts.n_fft // 2]
  return np.concatenate([spectrum.real, spectrum.imag], axis=1)


def _constant(module: nn.Module, name: str, array: np.ndarray) -> None:
  """Registers (or refills in place) the non-persistent buffer `name`: constants are functions of
  the config, so they are not stored in model.safetensors."""
  value = torch.from_numpy(np.ascontiguousarray(array))
  buffer = getattr(module, name, None)
  if isinstance(buffer, torch.Tensor) and buffer.device.type != 'meta':
    with torch.no_grad():
      buffer.copy_(value)
  else:
    module.register_buffer(name, value, persistent=False)


class LogMelFrontEnd(nn.Module):
  """Waveforms [B, S] (with true lengths [B]) -> normalised log-mel [B, target_length, mel]."""

  def __init__(self, preset: dict):
    super().__init__()
    self.opts = FrontEndOptions(preset)
    self.reset_constants()

  def reset_constants(self) -> None:
    # float64 constants: the spectrum's cancellations need them (see the module docstring).
    _constant(self, 'spectrum_matrix', frame_spectrum_matrix(self.opts))
    _constant(self, 'mel_banks', mel_banks(self.opts))

  def checked_lengths(self, waveform_bs: torch.Tensor, num_samples_b) -> torch.Tensor:
    """int64 [B] true clip lengths (default: all S samples), each in [0, S]."""
    batch, total = waveform_bs.shape
    if num_samples_b is None:
      return torch.full((batch,), total, dtype=torch.int64, device=waveform_bs.device)
    lengths = torch.as_tensor(num_samples_b, dtype=torch.int64, device=waveform_bs.device)
    lengths = lengths.reshape(-1)
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
      return lengths  # an exported graph's input: no data-dependent branch
    if lengths.shape != (batch,) or bool((lengths > total).any()) or bool((lengths < 0).any()):
      raise ValueError(
        f'num_samples must hold one length in [0, {total}] per clip; got {lengths.tolist()}.'
      )
    return lengths

  def log_mel(self, waveform_bs: torch.Tensor, num_samples_b=None) -> torch.Tensor:
    """Raw Kaldi log-mel float32 [B, T, mel], T = 1 + (S - window) // shift (fbank_device.log_mel):
    the waveform mean is taken over the true samples, and frames past a clip's end are 0."""
    opts, p = self.opts, self.opts.preset
    x_bs = torch.as_tensor(waveform_bs)
    if x_bs.ndim != 2 or not x_bs.is_floating_point():
      raise ValueError(f'waveforms must be a float tensor [batch, samples]; got {x_bs.shape}.')
    if x_bs.shape[1] < opts.window_length:
      raise ValueError(
        f'waveforms have {x_bs.shape[1]} samples; the front end needs at least '
        f'{opts.window_length} (one {p["frame_length_ms"]} ms window at {opts.sample_rate} Hz).'
      )
    # fbank_device casts to float32 first; the float64 arithmetic then follows the host path.
    x_bs = x_bs.to(self.spectrum_matrix.device, torch.float32).to(torch.float64)
    lengths_b = self.checked_lengths(x_bs, num_samples_b)
    if p['subtract_waveform_mean']:
      valid_bs = torch.arange(x_bs.shape[1], device=x_bs.device)[None, :] < lengths_b[:, None]
      total_b1 = torch.where(valid_bs, x_bs, 0.0).sum(dim=1, keepdim=True)
      x_bs = x_bs - total_b1 / lengths_b.clamp(min=1)[:, None].to(torch.float64)
    if p['waveform_scale'] != 1.0:
      x_bs = x_bs * p['waveform_scale']
    frames_btn = x_bs.unfold(1, opts.window_length, opts.frame_shift)
    spectrum_btc = frames_btn @ self.spectrum_matrix
    num_bins = opts.n_fft // 2
    power_btk = spectrum_btc[..., :num_bins] ** 2 + spectrum_btc[..., num_bins:] ** 2
    mel_btf = power_btk @ self.mel_banks
    log_mel_btf = torch.log(torch.clamp(mel_btf, min=p['log_floor'])).to(torch.float32)
    valid_bt = self.frame_valid(lengths_b, log_mel_btf.shape[1])
    return torch.where(valid_bt[..., None], log_mel_btf, 0.0)

  def frame_valid(self, num_samples_b, num_frames: int | None = None) -> torch.Tensor:
    """bool [B, T] (T: target_length by default): the frames that hold each clip of
    `num_samples_b` samples (snip_edges: 1 + (S - window) // shift, 0 below one window), i.e. the
    feature extractor's `attention_mask`."""
    opts = self.opts
    n = torch.as_tensor(num_samples_b, dtype=torch.int64).reshape(-1)
    frames = torch.where(
      n >= opts.window_length,
      1 + torch.div(n - opts.window_length, opts.frame_shift, rounding_mode='floor'),
      0,
    )
    length = opts.target_length if num_frames is None else num_frames
    return torch.arange(length, device=n.device)[None, :] < frames[:, None]

  def forward(self, waveform_bs: torch.Tensor, num_samples_b=None) -> torch.Tensor:
    """log_mel, then zero-pad (log domain, at the end) or crop to target_length, then normalise."""
    x_btf = self.log_mel(waveform_bs, num_samples_b)
    target = self.opts.target_length
    if x_btf.shape[1] >= target:
      x_btf = x_btf[:, :target]
    else:
      x_btf = F.pad(x_btf, (0, 0, 0, target - x_btf.shape[1]))
    # fbank_host.normalize: a multiply by the reciprocal, rounded once, in float32.
    return (x_btf - self.opts.preset['norm_mean']) * (1.0 / self.opts.norm_scale)


# ----------------------------------------------------------------------------------------------
# Stems (aasp_jax/models/conv_stem.py, aape.py, sblu.py)
# ----------------------------------------------------------------------------------------------


def _check_grid(x_btf: torch.Tensor, patch_t: int, patch_f: int) -> None:
  if torch.jit.is_tracing():
    return  # sizes are symbolic while tracing; the ONNX export checks its own input sizes
  if x_btf.ndim != 3 or x_btf.shape[1] % patch_t or x_btf.shape[2] % patch_f:
    raise ValueError(
      f'expected a log-mel batch [B, T, F] with T a multiple of {patch_t} and F of {patch_f}; '
      f'got {tuple(x_btf.shape)}.'
    )


class ConvPatchStem(nn.Module):
  """Conv patchifier (kernel = stride = patch): [B, T, F] -> [B, T // pt, F // pf, D]."""

  def __init__(self, width: int, patch_t: int, patch_f: int):
    super().__init__()
    self.patch_t, self.patch_f = patch_t, patch_f
    self.proj = nn.Conv2d(1, width, (patch_t, patch_f), stride=(patch_t, patch_f))

  def forward(self, x_btf: torch.Tensor) -> torch.Tensor:
    _check_grid(x_btf, self.patch_t, self.patch_f)
    return self.proj(x_btf[:, None]).permute(0, 2, 3, 1)


_EDGE_DECAY = 0.01  # sblu.EDGE_DECAY
_MARGIN = 1e-5  # sblu._MARGIN
_LOG_FLOOR = 1e-6  # aape._LOG_FLOOR


def lambda_bounds(kernel_size: int, patch_t: int, delta=1.0):
  """(alpha_min, omega_low, omega_high), as sblu.lambda_bounds."""
  half = (kernel_size - 1) / 2
  alpha_min = -math.log(_EDGE_DECAY) / (delta * max(half, 1.0))
  return alpha_min, math.pi / (patch_t * delta), math.pi / delta


def alpha_max(kernel_size: int, delta=1.0):
  """sblu.alpha_max: max(pi, 2 alpha_min(delta=1)) / delta."""
  return max(math.pi, 2.0 * lambda_bounds(kernel_size, 1)[0]) / delta


def constrain_lambda(z_alpha, z_omega, kernel_size: int, patch_t: int, delta=1.0):
  """sblu.constrain_lambda: affine maps of sigmoids strictly inside the admissible ranges."""
  alpha_min, omega_low, omega_high = lambda_bounds(kernel_size, patch_t, delta)
  a_lo, a_hi = alpha_min * (1.0 + _MARGIN), alpha_max(kernel_size, delta) * (1.0 - _MARGIN)
  alpha = a_lo + (a_hi - a_lo) * torch.sigmoid(z_alpha)
  frac = _MARGIN + (1.0 - 2.0 * _MARGIN) * torch.sigmoid(z_omega)
  return alpha, omega_low + (omega_high - omega_low) * frac


def sblu_kernel(alpha, omega, kernel_size: int, delta, window: str, phase: str):
  """sblu.sblu_kernel as a (real, imag) pair [..., K]:
  h[m] = s(Lambda) w[m] exp(i delta omega m'), s(Lambda) = 2 sinh(delta Lambda / 2) / Lambda,
  Lambda = alpha + i omega, m' = m ('analytic') or |m| ('literal')."""
  alpha, omega = alpha[..., None], omega[..., None]
  half = (kernel_size - 1) // 2
  m = torch.arange(-half, half + 1, dtype=torch.float32, device=alpha.device)
  if window == 'two_sided':
    decay = torch.exp(-delta * alpha * m.abs())
  else:
    decay = torch.where(m >= 0, torch.exp(-delta * alpha * m.clamp(min=0.0)), 0.0)
  angle = delta * omega * (m if phase == 'analytic' else m.abs())
  # 2 sinh(a + ib) = 2 (sinh a cos b + i cosh a sin b), then divided by alpha + i omega.
  a, b = delta * alpha / 2.0, delta * omega / 2.0
  num_re, num_im = 2.0 * torch.sinh(a) * torch.cos(b), 2.0 * torch.cosh(a) * torch.sin(b)
  den = alpha * alpha + omega * omega
  s_re = (num_re * alpha + num_im * omega) / den
  s_im = (num_im * alpha - num_re * omega) / den
  cos, sin = torch.cos(angle), torch.sin(angle)
  return decay * (s_re * cos - s_im * sin), decay * (s_re * sin + s_im * cos)


def log1p(x: torch.Tensor) -> torch.Tensor:
  """log(1 + x), accurate for small x in every graph: ONNX has no Log1p, and its log(1 + x) loses
  the digits of x below float32's eps (1e-5 relative on AaPE's envelope). Kahan's form
  log(u) * x / (u - 1), u = 1 + x, cancels the rounding of u."""
  u = 1.0 + x
  d = u - 1.0
  return torch.where(d == 0, x, torch.log(u) * (x / torch.where(d == 0, torch.ones_like(d), d)))


def depthwise_conv_same(u_btf, h_re_bgnk, h_im_bgnk):
  """sblu.depthwise_conv_same: y[b, n, f, j] = sum_m h[b, g(f), j, m] u[b, n - m, f] with zero
  'same' padding. Returns (real, imag) [B, T, G, F // G, N]."""
  batch, num_t, num_f = u_btf.shape
  _, num_g, num_n, kernel_size = h_re_bgnk.shape
  half = (kernel_size - 1) // 2
  u_pad = F.pad(u_btf, (0, 0, half, half))
  # Window k of u_pad at n is u[n + k - half] = u[n - m] for the tap m = half - k: the kernel is
  # read reversed.
  u_btgpk = u_pad.unfold(1, kernel_size, 1).reshape(
    batch, num_t, num_g, num_f // num_g, kernel_size
  )
  h_bgck = torch.cat([h_re_bgnk, h_im_bgnk], dim=2).flip(-1)
  y_btgpc = torch.einsum('btgpk,bgck->btgpc', u_btgpk, h_bgck)
  return y_btgpc[..., :num_n], y_btgpc[..., num_n:]


def modulation_tables(num_t, num_bands: int, device=None):
  """float32 (cos [T, T // 2], -sin [T, T // 2], pooling [T // 2, num_bands]) for a T-frame input:
  the real DFT of rFFT bins 1 .. T // 2 and sblu.modulation_pooling_matrix (triangular bands over
  the non-DC bins, columns summing to 1). Computed in float64 in the same order of operations as
  the numpy definitions, from T as a (possibly symbolic) size, so an exported graph serves any
  input length."""
  n = torch.arange(num_t, device=device)
  k = torch.arange(1, num_t // 2 + 1, device=device)
  # n k mod T: the angles stay in [0, 2 pi), so the table is exactly T-periodic in n k whatever the
  # runtime's cos does with large arguments (onnxruntime's did not: a periodic input's zero bins
  # read as noise ~1e-3 of the signal there).
  # (The divisor is T as a tensor, n[-1] + 1: the ONNX exporter has no remainder by a symbolic size.)
  index = torch.remainder(n[:, None] * k[None, :], n[-1:] + 1)
  angle = 2.0 * math.pi * index.to(torch.float64) / num_t
  cos_tk = torch.cos(angle).to(torch.float32)
  sin_tk = -torch.sin(angle).to(torch.float32)
  theta_k = 2.0 * math.pi * k.to(torch.float64) / num_t
  theta_b = math.pi * (torch.arange(num_bands, dtype=torch.float64, device=device) + 0.5)
  theta_b = theta_b / num_bands
  # max(pi / bands, 2 pi / T); 2 pi / T is theta_k[0], computed the same way.
  width = torch.clamp(theta_k[:1], min=math.pi / num_bands)
  weights = torch.clamp(1.0 - (theta_k[:, None] - theta_b[None, :]).abs() / width, min=0.0)
  pool_kc = (weights / weights.sum(dim=0, keepdim=True)).to(torch.float32)
  return cos_tk, sin_tk, pool_kc


class LambdaEncoder(nn.Module):
  """aape.LambdaEncoder: log-mel [B, T, F] -> (alpha, omega) [B, G, N]."""

  def __init__(self, aape: dict, patch_t: int, patch_f: int, num_groups: int):
    super().__init__()
    self.num_modes, self.kernel_size = aape['num_modes'], aape['kernel_size']
    self.patch_t, self.patch_f, self.mode = patch_t, patch_f, aape['lambda_mode']
    self.num_bands = aape['num_mod_bands']
    # Exports written before the field existed used no relative floor (aape.SPECTRUM_FLOOR).
    self.spectrum_floor = float(aape.get('spectrum_floor', 0.0))
    if self.mode == 'fixed':
      self.z_alpha = nn.Parameter(torch.zeros(num_groups, self.num_modes))
      self.z_omega = nn.Parameter(torch.zeros(num_groups, self.num_modes))
      return
    hidden = aape['lambda_hidden']
    self.norm = nn.LayerNorm(self.num_bands, eps=1e-6)  # flax's default epsilon
    self.hidden = nn.Linear(self.num_bands, hidden)
    self.group_embedding = nn.Parameter(torch.zeros(num_groups, hidden))
    self.out = nn.Linear(hidden, 2 * self.num_modes)

  def forward(self, x_btf: torch.Tensor, delta):
    batch, num_t, num_f = x_btf.shape
    num_g, num_n = num_f // self.patch_f, self.num_modes
    if self.mode == 'fixed':
      z_alpha = self.z_alpha.expand(batch, num_g, num_n)
      z_omega = self.z_omega.expand(batch, num_g, num_n)
      return constrain_lambda(z_alpha, z_omega, self.kernel_size, self.patch_t, delta)
    u_btg = x_btf.reshape(batch, num_t, num_g, self.patch_f).mean(-1)
    u_btg = u_btg - u_btg[:, :1]  # a constant series becomes exactly zero (see aape.py)
    u_btg = u_btg - u_btg.mean(dim=1, keepdim=True)
    cos_tk, sin_tk, pool_kc = modulation_tables(num_t, self.num_bands, x_btf.device)
    cos_tk, sin_tk, pool_kc = (t.to(x_btf.dtype) for t in (cos_tk, sin_tk, pool_kc))
    re_bgk = torch.einsum('btg,tk->bgk', u_btg, cos_tk) / num_t
    im_bgk = torch.einsum('btg,tk->bgk', u_btg, sin_tk) / num_t
    white_bg1 = torch.sqrt((u_btg * u_btg).mean(dim=1) / num_t)[..., None]
    floor_bg1 = _LOG_FLOOR + self.spectrum_floor * white_bg1
    # log1p(|X| / floor): log(|X| + floor) up to a shift the LayerNorm removes (see aape.py).
    logmag_bgk = log1p(torch.sqrt(re_bgk * re_bgk + im_bgk * im_bgk) / floor_bg1)
    h_bgc = self.norm(logmag_bgk @ pool_kc)
    # flax's nn.gelu defaults to the tanh approximation (the encoder MLP uses the exact one).
    h_bgh = F.gelu(self.hidden(h_bgc) + self.group_embedding, approximate='tanh')
    z_bgo = self.out(h_bgh)
    return constrain_lambda(
      z_bgo[..., :num_n], z_bgo[..., num_n:], self.kernel_size, self.patch_t, delta
    )


class AaPEStem(nn.Module):
  """aape.AaPE: log-mel [B, T, F] -> conv tokens fused with SBLU envelope features [B, T', G, D]."""

  def __init__(self, width: int, patch_t: int, patch_f: int, num_mel_bins: int, aape: dict):
    super().__init__()
    self.patch_t, self.patch_f = patch_t, patch_f
    self.num_modes, self.kernel_size = aape['num_modes'], aape['kernel_size']
    self.window, self.phase, self.fusion = aape['window'], aape['phase'], aape['fusion']
    self.learn_delta, self.delta = aape['learn_delta'], float(aape['delta'])
    num_g = num_mel_bins // patch_f
    self.conv_stem = ConvPatchStem(width, patch_t, patch_f)
    if self.learn_delta:
      self.log_delta = nn.Parameter(torch.tensor(math.log(self.delta)))
    self.lambda_encoder = LambdaEncoder(aape, patch_t, patch_f, num_g)
    self.mix_in = nn.Parameter(torch.zeros(num_g, self.num_modes, 2))
    self.mix_out = nn.Parameter(torch.zeros(num_g, self.num_modes, 2))
    self.feature_proj = nn.Linear(patch_f * self.num_modes, width)
    if self.fusion == 'gate':
      self.gate = nn.Parameter(torch.zeros(width))
    else:
      self.fusion_proj = nn.Linear(2 * width, width)

  def analyse(self, x_btf: torch.Tensor):
    """The AaPE branch before its projection: (alpha [B, G, N], omega [B, G, N], the pooled
    envelope [B, T // pt, G, pf N]), what aape.AaPE sows as 'alpha', 'omega' and 'features'."""
    _check_grid(x_btf, self.patch_t, self.patch_f)
    batch, num_t, num_f = x_btf.shape
    delta = torch.exp(self.log_delta) if self.learn_delta else self.delta
    alpha_bgn, omega_bgn = self.lambda_encoder(x_btf, delta)
    h_re, h_im = sblu_kernel(alpha_bgn, omega_bgn, self.kernel_size, delta, self.window, self.phase)
    # S4D-style complex mixing: h * (mix_out * mix_in), (real, imag) pairs.
    o_re, o_im = self.mix_out.unbind(-1)
    i_re, i_im = self.mix_in.unbind(-1)
    p_re = (o_re * i_re - o_im * i_im)[None, :, :, None]
    p_im = (o_re * i_im + o_im * i_re)[None, :, :, None]
    h_re, h_im = h_re * p_re - h_im * p_im, h_re * p_im + h_im * p_re
    # Each subband's clip mean is removed before the band-pass (see aape.AaPE).
    u_btf = x_btf - x_btf.mean(dim=1, keepdim=True)
    y_re, y_im = depthwise_conv_same(u_btf, h_re, h_im)
    env = log1p(torch.sqrt(y_re * y_re + y_im * y_im))  # [B, T, G, pf, N]
    num_g = num_f // self.patch_f
    feat = env.reshape(batch, num_t // self.patch_t, self.patch_t, num_g, -1).mean(dim=2)
    return alpha_bgn, omega_bgn, feat

  def forward(self, x_btf: torch.Tensor) -> torch.Tensor:
    conv_btgd = self.conv_stem(x_btf)
    feat_btgd = self.feature_proj(self.analyse(x_btf)[2])
    if self.fusion == 'gate':
      return conv_btgd + self.gate * feat_btgd
    return self.fusion_proj(torch.cat([conv_btgd, feat_btgd], dim=-1))


# ----------------------------------------------------------------------------------------------
# Encoder (aasp_jax/models/posemb.py, attention.py, vit.py)
# ----------------------------------------------------------------------------------------------


def sincos_1d(dim: int, positions: np.ndarray, dtype=np.float64) -> np.ndarray:
  """posemb._sincos_1d: [P, dim], half sines, half cosines, geometric frequencies (float32: as
  MAE's / EAT's code computes it, for 'sincos_mae')."""
  omega = np.arange(dim // 2, dtype=dtype)
  omega /= dim / 2.0
  omega = 1.0 / 10000**omega
  angles = np.einsum('p,d->pd', positions.astype(dtype), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_table(dim: int, num_time: int, num_freq: int, kind: str = 'sincos') -> np.ndarray:
  """posemb.sincos_table: float32 [num_time, num_freq, dim]; 'sincos' encodes time in the first
  half of the width and frequency in the second, 'sincos_mae' (MAE / Audio-MAE / EAT) the
  reverse."""
  if dim % 4:
    raise ValueError(f'2-D sin-cos embedding needs a width divisible by 4, got {dim}.')
  dtype = np.float64 if kind == 'sincos' else np.float32
  t_emb = np.broadcast_to(
    sincos_1d(dim // 2, np.arange(num_time), dtype)[:, None], (num_time, num_freq, dim // 2)
  )
  f_emb = np.broadcast_to(
    sincos_1d(dim // 2, np.arange(num_freq), dtype)[None], (num_time, num_freq, dim // 2)
  )
  halves = [t_emb, f_emb] if kind == 'sincos' else [f_emb, t_emb]
  return np.concatenate(halves, axis=-1).astype(np.float32)


class Attention(nn.Module):
  """Self-attention with separate query/key/value projections (attention.Attention)."""

  def __init__(self, width: int, num_heads: int):
    super().__init__()
    if width % num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads={num_heads}.')
    self.num_heads = num_heads
    self.query, self.key, self.value, self.out = (nn.Linear(width, width) for _ in range(4))

  def forward(self, x_bnd: torch.Tensor, mask_b11n=None) -> torch.Tensor:
    batch, n, width = x_bnd.shape

    def heads(y):
      return y.reshape(batch, n, self.num_heads, width // self.num_heads).transpose(1, 2)

    # Masked keys get zero weight (jax.nn.dot_product_attention's boolean mask, True = attend).
    out = F.scaled_dot_product_attention(
      heads(self.query(x_bnd)), heads(self.key(x_bnd)), heads(self.value(x_bnd)), mask_b11n
    )
    return self.out(out.transpose(1, 2).reshape(batch, n, width))


class Mlp(nn.Module):
  def __init__(self, width: int, mlp_dim: int):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(width, mlp_dim), nn.Linear(mlp_dim, width)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as attention.Mlp


class EncoderBlock(nn.Module):
  """Transformer block (vit.EncoderBlock): pre-LN x + f(norm(x)), or post-LN norm(x + f(x))."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int, block_norm='pre', eps=1e-6):
    super().__init__()
    self.post = block_norm == 'post'
    self.norm1 = nn.LayerNorm(width, eps=eps)
    self.attn = Attention(width, num_heads)
    self.norm2 = nn.LayerNorm(width, eps=eps)
    self.mlp = Mlp(width, mlp_dim)

  def forward(self, x_bnd, mask_b11n=None):
    if self.post:
      x_bnd = self.norm1(x_bnd + self.attn(x_bnd, mask_b11n))
      return self.norm2(x_bnd + self.mlp(x_bnd))
    x_bnd = x_bnd + self.attn(self.norm1(x_bnd), mask_b11n)
    return x_bnd + self.mlp(self.norm2(x_bnd))


class AaSPEncoder(nn.Module):
  """The exported encoder: front end, patch stem, positions, CLS, blocks, norm(s), pooling.

  Attributes:
    model: config.json's 'model' section (the architecture).
    preset: the front-end preset (config.json's 'frontend').
    config: config.json's dict, when loaded with `from_pretrained`.
    front_end: the `LogMelFrontEnd`.
  """

  def __init__(self, model: dict, preset: dict):
    super().__init__()
    check_model_config(model)
    self.config = {'model': dict(model), 'frontend': dict(preset)}
    self.model, self.preset = model_options(model), dict(preset)
    model = self.model
    self.front_end = LogMelFrontEnd(preset)
    opts = self.front_end.opts
    self.width, self.patch_t, self.patch_f = model['width'], model['patch_t'], model['patch_f']
    if opts.target_length % self.patch_t or opts.num_mel_bins % self.patch_f:
      raise ValueError(
        f'the window of {opts.target_length} frames x {opts.num_mel_bins} mel bins does not tile '
        f'into {self.patch_t} x {self.patch_f} patches.'
      )
    self.n_freq = opts.num_mel_bins // self.patch_f
    self.max_time_patches = model['max_time_patches']
    self.posemb_kind, self.block_norm = model['posemb'], model['block_norm']
    eps = float(model['norm_eps'])
    if model['stem'] == 'conv':
      self.stem = ConvPatchStem(self.width, self.patch_t, self.patch_f)
    else:
      self.stem = AaPEStem(self.width, self.patch_t, self.patch_f, opts.num_mel_bins, model['aape'])
    self.cls = nn.Parameter(torch.zeros(1, 1, self.width))
    if self.posemb_kind == 'learned':
      self.posemb = nn.Parameter(torch.zeros(self.max_time_patches, self.n_freq, self.width))
    if self.block_norm == 'post':
      self.input_norm = nn.LayerNorm(self.width, eps=eps)
    self.blocks = nn.ModuleList(
      EncoderBlock(self.width, model['num_heads'], model['mlp_dim'], self.block_norm, eps)
      for _ in range(model['depth'])
    )
    if self.block_norm == 'pre':
      self.norm = nn.LayerNorm(self.width, eps=eps)
    self.reset_constants()

  def reset_constants(self) -> None:
    """(Re)computes the fixed position tables (non-persistent buffers; none for 'learned')."""
    if self.posemb_kind == 'learned':
      return
    # The time and frequency halves are kept apart, [max_time_patches, D/2] and [n_freq, D/2], and
    # the grid is assembled per input: the rows equal sincos_table's, in far less memory.
    half = self.width // 2
    if self.width % 4:
      raise ValueError(f'2-D sin-cos embedding needs a width divisible by 4, got {self.width}.')
    time_table = sincos_1d(half, np.arange(self.max_time_patches)).astype(np.float32)
    _constant(self, 'posemb_time', time_table)
    _constant(self, 'posemb_freq', sincos_1d(half, np.arange(self.n_freq)).astype(np.float32))

  # Loading --------------------------------------------------------------------------------------

  @classmethod
  def from_pretrained(cls, export_dir: str | os.PathLike) -> AaSPEncoder:
    """The encoder of an aasp-jax export folder, in eval mode, float32, on the CPU.

    Raises:
      FileNotFoundError: for a missing file of the folder.
      ValueError (`ExportFormatError` for a bad file): naming the file, and for a tensor its name
        and expected shape; or naming the config field of an unsupported option.
    """
    config, tensors, where = read_export(export_dir)
    model = cls(config['model'], config['frontend'])
    model.config = config
    encoder = {k: v for k, v in tensors.items() if k.startswith(ENCODER_PREFIX)}
    model.load_tensors(encoder, where, prefix=ENCODER_PREFIX)
    return model.eval()

  def load_tensors(self, tensors: dict, where: str = 'the tensors', prefix: str = '') -> None:
    """Copies a state dict in (names carry `prefix`); a missing, extra or mis-shaped tensor raises
    ExportFormatError naming it, its expected shape and `where`."""
    expected = {prefix + k: tuple(v.shape) for k, v in self.state_dict().items()}
    compare_tensors(
      {k: tuple(v.shape) for k, v in tensors.items()},
      expected,
      where,
      f"the architecture of config.json's 'model' section ({self.model['stem']} stem)",
    )
    state = {k[len(prefix) :]: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}
    self.load_state_dict(state, strict=True)

  # Forward -------------------------------------------------------------------------------------

  def positions(self, n_time) -> torch.Tensor:
    """float32 [n_time * n_freq, D], time-major: the position table cropped to n_time patches."""
    if not torch.jit.is_tracing() and n_time > self.max_time_patches:
      raise ValueError(
        f'input has {n_time} time patches but the position table holds {self.max_time_patches}.'
      )
    if self.posemb_kind == 'learned':
      table = self.posemb[:n_time]
    else:
      half = self.width // 2
      t_emb = self.posemb_time[:n_time][:, None, :].expand(n_time, self.n_freq, half)
      f_emb = self.posemb_freq[None, :, :].expand(n_time, self.n_freq, half)
      halves = [t_emb, f_emb] if self.posemb_kind == 'sincos' else [f_emb, t_emb]
      table = torch.cat(halves, dim=-1)
    return table.reshape(n_time * self.n_freq, self.width)

  def forward(self, log_mel_btf: torch.Tensor, token_valid=None) -> dict[str, torch.Tensor]:
    """Encodes normalised log-mel [B, T, mel] (T a multiple of patch_t, up to
    max_time_patches * patch_t frames).

    Args:
      log_mel_btf: float log-mel, e.g. from `features`.
      token_valid: optional bool [B, n_time * n_freq] (time-major); False marks padding that no
        token may attend to.

    Returns:
      {'cls': [B, D], 'tokens': [B, n_time * n_freq, D]}, after the final norm (pre-LN) or the
      last block (post-LN).
    """
    x_btf = torch.as_tensor(log_mel_btf, dtype=self.cls.dtype, device=self.cls.device)
    grid_btfd = self.stem(x_btf)
    batch, n_time, n_freq, width = grid_btfd.shape
    tokens_bnd = grid_btfd.reshape(batch, n_time * n_freq, width) + self.positions(n_time)
    x_bnd = torch.cat([self.cls.expand(batch, 1, width), tokens_bnd], dim=1)
    mask = None
    if token_valid is not None:
      valid_bn = torch.as_tensor(token_valid, dtype=torch.bool, device=x_btf.device)
      if valid_bn.shape != (batch, n_time * n_freq):
        raise ValueError(
          f'token_valid must be [batch, {n_time * n_freq}]; got {tuple(valid_bn.shape)}.'
        )
      valid_bn = torch.cat(
        [torch.ones(batch, 1, dtype=torch.bool, device=x_btf.device), valid_bn], dim=1
      )
      mask = valid_bn[:, None, None, :]
    if self.block_norm == 'post':
      x_bnd = self.input_norm(x_bnd)
    for block in self.blocks:
      x_bnd = block(x_bnd, mask)
    if self.block_norm == 'pre':
      x_bnd = self.norm(x_bnd)
    return {'cls': x_bnd[:, 0], 'tokens': x_bnd[:, 1:]}

  def features(self, waveform_bs: torch.Tensor, num_samples_b=None) -> torch.Tensor:
    """Normalised log-mel [B, target_length, mel] of waveforms [B, S] at the preset's sample rate
    (zero-padded to S; true lengths `num_samples_b` [B], default S): the clips' first window."""
    return self.front_end(waveform_bs, num_samples_b)

  def token_valid(self, num_samples_b) -> torch.Tensor:
    """bool [B, n_time * n_freq]: a time patch is valid if it holds a frame of the clip."""
    return self.token_valid_of_frames(self.frame_valid(num_samples_b))

  def frame_valid(self, num_samples_b) -> torch.Tensor:
    """bool [B, target_length]: the frames that hold each clip (`LogMelFrontEnd.frame_valid`)."""
    return self.front_end.frame_valid(
      torch.as_tensor(num_samples_b, dtype=torch.int64, device=self.cls.device)
    )

  def token_valid_of_frames(self, frame_valid_bt) -> torch.Tensor:
    """bool [B, n_time * n_freq] of a frame mask [B, T] (1 for the clip's frames, as the feature
    extractor's `attention_mask`): a time patch is valid if it holds a frame of the clip, i.e. its
    first frame (the rule of `token_valid` and of aasp_jax/evaluate/embed.py)."""
    valid_bt = torch.as_tensor(frame_valid_bt, device=self.cls.device) != 0
    first_bt = valid_bt[:, :: self.patch_t]
    batch, n_time = first_bt.shape
    return first_bt[:, :, None].expand(batch, n_time, self.n_freq).reshape(batch, -1)

  @staticmethod
  def scene(out: dict, token_valid=None) -> torch.Tensor:
    """[B, 2 D]: CLS ++ the mean of the valid patch tokens (all of them without a mask), the
    scene embedding of one window (embed's 'cls_mean')."""
    tokens = out['tokens']
    if token_valid is None:
      mean = tokens.mean(dim=1)
    else:
      weights = torch.as_tensor(token_valid, device=tokens.device).to(tokens.dtype)[..., None]
      mean = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return torch.cat([out['cls'], mean], dim=-1)

  # Embeddings (aasp_jax/evaluate/embed.py) -----------------------------------------------------

  def window_starts(self, num_samples: int) -> list[int]:
    """Start frames of a clip's windows: target_length frames each, no overlap, enough to reach
    the clip's last frame (one window when the clip fits)."""
    opts = self.front_end.opts
    frames, window = opts.num_frames(num_samples), opts.target_length
    if frames <= window:
      return [0]
    return [k * window for k in range(1 + math.ceil((frames - window) / window))]

  def patch_centres_ms(self, start_frame: int) -> np.ndarray:
    """Timestamps (ms) of the time patches of the window starting at `start_frame`."""
    opts = self.front_end.opts
    first = start_frame + self.patch_t * np.arange(opts.target_length // self.patch_t)
    span = (self.patch_t - 1) * opts.frame_shift + opts.window_length
    return (first * opts.frame_shift + span / 2) * 1000.0 / opts.sample_rate

  def _cut(self, waves_bs: torch.Tensor, lengths: list[int]):
    """Every clip's windows, zero-padded, as embed.Embedder._cut cuts them from the clip's own
    samples: (windows [K, window_samples], true lengths [K], owning clip [K], start frame [K])."""
    opts = self.front_end.opts
    chunks, valid, owners, starts = [], [], [], []
    for i, n in enumerate(lengths):
      for start in self.window_starts(n):
        begin = start * opts.frame_shift
        piece = waves_bs[i, begin : min(n, begin + opts.window_samples)]
        chunks.append(F.pad(piece, (0, opts.window_samples - piece.shape[0])))
        valid.append(piece.shape[0])
        owners.append(i)
        starts.append(start)
    return torch.stack(chunks), torch.tensor(valid, device=waves_bs.device), owners, starts

  def _pooled(self, windows_ws, valid_w, batch_size: int):
    """Per window (embed.window_outputs): CLS [K, D] and the valid tokens' mean [K, D] (float64),
    valid-token count [K], time patches [K, n_time, n_freq D] and their validity [K, n_time]."""
    outs = []
    for k in range(0, len(windows_ws), batch_size):
      rows = slice(k, k + batch_size)
      x_btf = self.features(windows_ws[rows], valid_w[rows])
      outs.append(self(x_btf, self.token_valid(valid_w[rows])))
    tokens_wnd = torch.cat([o['tokens'] for o in outs])
    valid_wn = self.token_valid(valid_w)
    count_w = valid_wn.sum(dim=1).double()
    mean_wd = (tokens_wnd.double() * valid_wn[..., None]).sum(dim=1)
    mean_wd = mean_wd / count_w.clamp(min=1.0)[:, None]
    n_time = self.front_end.opts.target_length // self.patch_t
    patches_wtc = tokens_wnd.reshape(len(windows_ws), n_time, -1)
    time_valid_wt = valid_wn.reshape(len(windows_ws), n_time, self.n_freq)[..., 0]
    cls_wd = torch.cat([o['cls'] for o in outs]).double()
    return cls_wd, mean_wd, count_w, patches_wtc, time_valid_wt

  @torch.no_grad()
  def embed(self, waveform_bs, num_samples_b=None, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Scene and frame embeddings of clips of any length, as `embed.Embedder` with its defaults.

    Each clip is cut into windows of target_length frames; time patches with no frame of the clip
    are masked as attention keys and left out of the pooling, so a clip's embeddings do not
    depend on the other clips of the batch.

    Args:
      waveform_bs: float [B, S] mono waveforms at the preset's sample rate, zero-padded to S.
      num_samples_b: true lengths [B] (default S); each at least one analysis window.
      batch_size: windows per forward pass.

    Returns:
      'scene': float32 [B, 2 D], CLS ++ mean of the valid tokens, averaged over a clip's windows
        weighted by their valid tokens ('cls_mean');
      'frames': float32 [B, T', n_freq D], one embedding per valid time patch, its frequency
        patches concatenated ('concat'); clips with fewer than T' are zero-padded;
      'timestamps_ms': float32 [B, T'] the time patches' centres, NaN for padding.
    """
    opts = self.front_end.opts
    waves = torch.as_tensor(waveform_bs)
    if waves.ndim != 2 or not waves.is_floating_point():
      raise ValueError(f'waveforms must be a float tensor [batch, samples]; got {waves.shape}.')
    waves = waves.to(self.cls.device, torch.float32)
    lengths = self.front_end.checked_lengths(waves, num_samples_b).tolist()
    short = [i for i, n in enumerate(lengths) if n < opts.window_length]
    if short:
      raise ValueError(
        f'clip(s) {short} are shorter than one analysis window ({opts.window_length} samples).'
      )
    windows_ws, valid_w, owners, starts = self._cut(waves, lengths)
    cls_wd, mean_wd, count_w, patches_wtc, time_valid_wt = self._pooled(
      windows_ws, valid_w, batch_size
    )
    scenes, frames, times = [], [], []
    for i in range(len(lengths)):
      rows = [w for w, owner in enumerate(owners) if owner == i]
      weights = count_w[rows] / count_w[rows].sum()
      scenes.append(torch.cat([weights @ cls_wd[rows], weights @ mean_wd[rows]]).float())
      # With windows that do not overlap, every valid patch is reported, by its own window.
      frames.append(torch.cat([patches_wtc[w][time_valid_wt[w]] for w in rows]))
      centres = [self.patch_centres_ms(starts[w])[time_valid_wt[w].cpu().numpy()] for w in rows]
      times.append(torch.from_numpy(np.concatenate(centres).astype(np.float32)))
    longest = max(len(t) for t in times)
    frames_btc = patches_wtc.new_zeros(len(lengths), longest, patches_wtc.shape[-1])
    times_bt = torch.full((len(lengths), longest), float('nan'))
    for i, (f, t) in enumerate(zip(frames, times)):
      frames_btc[i, : len(t)], times_bt[i, : len(t)] = f, t
    return {'scene': torch.stack(scenes), 'frames': frames_btc, 'timestamps_ms': times_bt}


class AaSPClassifier(nn.Module):
  """A fine-tuned encoder with its linear head: logits = classifier(encoder(log_mel)['cls']).

  Attributes:
    encoder: the `AaSPEncoder`.
    classifier: nn.Linear(D, num_labels).
    labels: the label names, in logit order.
    multilabel: True when the labels are independent (sigmoid), False for one label (softmax).
  """

  def __init__(self, model: dict, preset: dict, labels, multilabel: bool = False):
    super().__init__()
    self.encoder = AaSPEncoder(model, preset)
    self.labels, self.multilabel = tuple(labels), bool(multilabel)
    self.classifier = nn.Linear(self.encoder.width, len(self.labels))

  @classmethod
  def from_pretrained(cls, export_dir: str | os.PathLike) -> AaSPClassifier:
    """The classifier of an aasp-jax classification export (config.json has 'id2label')."""
    config, tensors, where = read_export(export_dir)
    id2label = config.get('id2label')
    if not isinstance(id2label, dict) or not id2label:
      raise ExportFormatError(
        f'{os.path.join(os.fspath(export_dir), CONFIG)}: no id2label: this export is an encoder '
        'without a classification head (load it with AaSPEncoder.from_pretrained).'
      )
    labels = [id2label[str(i)] for i in range(len(id2label))]
    multilabel = config.get('problem_type') == 'multi_label_classification'
    model = cls(config['model'], config['frontend'], labels, multilabel)
    model.encoder.config = config
    model.load_tensors(tensors, where)
    return model.eval()

  def load_tensors(self, tensors: dict, where: str = 'the tensors') -> None:
    """Copies the state dict in ('encoder.*', 'classifier.*'), with errors as
    `AaSPEncoder.load_tensors`."""
    compare_tensors(
      {k: tuple(v.shape) for k, v in tensors.items()},
      {k: tuple(v.shape) for k, v in self.state_dict().items()},
      where,
      f"the architecture of config.json's 'model' section with {len(self.labels)} labels",
    )
    state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}
    self.load_state_dict(state, strict=True)

  def forward(self, log_mel_btf: torch.Tensor, token_valid=None) -> torch.Tensor:
    """Logits [B, num_labels] of normalised log-mel [B, T, mel]."""
    return self.classifier(self.encoder(log_mel_btf, token_valid)['cls'])

  @torch.no_grad()
  def predict(self, waveform_bs: torch.Tensor, num_samples_b=None) -> torch.Tensor:
    """Logits [B, num_labels] of each clip's first window (from its start, zero-padded, as
    `AaSPEncoder.features` gives it; no token mask, as in fine-tuning)."""
    return self(self.encoder.features(waveform_bs, num_samples_b))


# ----------------------------------------------------------------------------------------------
# Export folders
# ----------------------------------------------------------------------------------------------


def read_json(path: str) -> dict:
  """A JSON object file of an export folder, with errors naming the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f'{path}: missing (an aasp-jax export folder holds {CONFIG}, {WEIGHTS}).'
    )
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except (UnicodeDecodeError, ValueError) as e:
    raise ExportFormatError(f'{path}: not valid JSON ({e}).') from None
  if not isinstance(value, dict):
    raise ExportFormatError(f'{path}: must hold a JSON object.')
  return value


def check_config(config: dict, path: str) -> None:
  """The config.json fields every reader relies on."""
  for key in ('format', 'format_version', 'model', 'frontend', 'tensors'):
    if key not in config:
      raise ExportFormatError(f'{path}: missing key {key!r}.')
  if config['format'] != FORMAT or config.get('layout') != LAYOUT:
    raise ExportFormatError(
      f'{path}: format {config["format"]!r} / layout {config.get("layout")!r}; this reader '
      f'handles {FORMAT!r} / {LAYOUT!r} (an older aasp-jax wrote it: export the checkpoint again).'
    )
  if config['format_version'] != FORMAT_VERSION:
    raise ExportFormatError(
      f'{path}: format_version {config["format_version"]!r}; this reader handles '
      f'{FORMAT_VERSION} (export the checkpoint again with a matching aasp-jax version).'
    )
  if not isinstance(config['model'], dict) or not isinstance(config['frontend'], dict):
    raise ExportFormatError(f"{path}: 'model' and 'frontend' must be JSON objects.")
  tensors = config['tensors']
  if not isinstance(tensors, dict) or not all(
    isinstance(s, list) and all(isinstance(d, int) and d >= 0 for d in s) for s in tensors.values()
  ):
    raise ExportFormatError(f"{path}: 'tensors' must map names to lists of sizes.")


def read_weights(path: str) -> dict[str, np.ndarray]:
  """{name: float32 array} of a safetensors file, with errors naming the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: missing (every export folder has {WEIGHTS}).')
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(8)
  length = int.from_bytes(head, 'little') if len(head) == 8 else None
  if length is None or 8 + length > size:
    raise ExportFormatError(
      f'{path}: the header length field says {length} bytes but the file has {size} bytes: the '
      'file is truncated or not safetensors.'
    )
  try:
    tensors = safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, ValueError, OSError) as e:
    raise ExportFormatError(
      f'{path}: not a readable safetensors file ({e}); it is truncated or corrupted.'
    ) from None
  for name, array in tensors.items():
    if array.dtype != np.float32:
      raise ExportFormatError(f'{path}: tensor {name!r} is {array.dtype}, not float32.')
  return tensors


def read_export(export_dir: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray], str]:
  """(config.json's dict, {name: float32 array}, weights path) of an export folder, the tensors
  checked against config.json's 'tensors' list."""
  export_dir = os.fspath(export_dir)
  config_path = os.path.join(export_dir, CONFIG)
  config = read_json(config_path)
  check_config(config, config_path)
  weights_path = os.path.join(export_dir, WEIGHTS)
  tensors = read_weights(weights_path)
  compare_tensors(
    {k: v.shape for k, v in tensors.items()},
    config['tensors'],
    weights_path,
    f"{config_path}'s 'tensors'",
  )
  return config, tensors, weights_path


def compare_tensors(got: dict, want: dict, got_what: str, want_what: str) -> None:
  """Raises ExportFormatError naming the first missing / extra / mis-shaped tensor."""
  for name in sorted(want):
    if name not in got:
      raise ExportFormatError(
        f'tensor {name!r} (expected shape {list(want[name])}, as {want_what}) is missing from '
        f'{got_what}.'
      )
  for name in sorted(got):
    if name not in want:
      raise ExportFormatError(
        f'tensor {name!r} (shape {list(got[name])}) in {got_what} is not one {want_what} has.'
      )
    if tuple(got[name]) != tuple(want[name]):
      raise ExportFormatError(
        f'tensor {name!r} has shape {list(got[name])} in {got_what}, but {want_what} expected '
        f'shape {list(want[name])}.'
      )
