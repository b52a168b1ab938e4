"""The AaSP encoder rebuilt in PyTorch from an export folder, front end included (no JAX, no Flax).

  from aasp_jax.export.torch_model import AaSPEncoder
  model = AaSPEncoder.from_pretrained('exports/quickstart')    # eval mode, float32, CPU
  out = model.embed(waveforms_bs, num_samples_b)   # 'scene' [B, 2D], 'frames' [B, T', F' D], ...
  x_btf = model.features(waveforms_bs)             # normalised log-mel of one window
  tokens = model(x_btf)['tokens']                  # [B, patches, D]

This file mirrors, operation for operation, the JAX definitions it reproduces (and the parity test
holds them to a relative error below 1e-4):

- front end: aasp_jax/audio/mel.py, fbank_host.py, fbank_device.py (Kaldi framing with
  snip_edges, per-frame DC removal, pre-emphasis, window, power spectrum, Kaldi mel banks, log
  floor, pad/crop to target_length with 0 in the log domain, normalisation);
- stems: aasp_jax/models/conv_stem.py and aape.py / sblu.py (Lambda encoder, SBLU kernels,
  per-example depthwise convolution, envelope, pooling, projection, gate or concat fusion);
- encoder: posemb.py (fixed 2-D sin-cos), attention.py and vit.py (pre-LN blocks, padded tokens
  masked as attention keys, final norm);
- pooling: aasp_jax/evaluate/embed.py's Embedder with its defaults (windows of target_length
  frames without overlap, scene pooling 'cls_mean', timestamp pooling 'concat').

The front end computes the spectrum in float64, as the host path does (in float32, bins just above
the log floor of loud frames would be off by ~1e-3 in the log). Complex values are carried as
(real, imag) pairs, so the module holds only real tensors. Weights are read from the native layout
(flax names and shapes) and converted to PyTorch's on load: a Dense kernel [in, out] becomes
`nn.Linear.weight` [out, in], a conv kernel HWIO becomes OIHW.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aasp_jax.export import safetensors_io

FORMAT = 'aasp-jax-encoder'
FORMAT_VERSION = 1
LAYOUT = 'native'
WEIGHTS = 'model.safetensors'
CONFIG = 'config.json'
PREPROCESSOR = 'preprocessor_config.json'

# The config fields this rebuild reads, and those that do not change the function it computes
# (precision, memory and kernel choices of the JAX run; the predictor is not part of the encoder).
_MODEL_FIELDS = frozenset(
  'variant width depth num_heads mlp_dim patch_t patch_f stem aape max_time_patches '
  'drop_path dtype param_dtype remat scan_layers attention_impl predictor'.split()
)
_AAPE_FIELDS = frozenset(
  'num_modes kernel_size window phase lambda_mode fusion delta learn_delta '
  'num_mod_bands lambda_hidden'.split()
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
  'subtract_waveform_mean waveform_scale target_length norm_mean norm_std norm_mode '
  'feature_layout'.split()
)
_WINDOWS = ('hann_symmetric', 'hann_periodic', 'hamming', 'povey')
_NORM_MODES = ('audioset_2std', 'std')


def _unsupported(field: str, value, supported) -> ValueError:
  return ValueError(
    f'{field}={value!r} is not supported by the PyTorch rebuild (aasp_jax.export.torch_model); '
    f'it supports {supported}. Re-export a model with a supported setting or port the option.'
  )


def check_model_config(model: dict) -> None:
  """Raises ValueError naming the field for any model option this rebuild does not implement."""
  for key in sorted(set(model) - _MODEL_FIELDS):
    raise _unsupported(f'model.{key}', model[key], f'only the fields {sorted(_MODEL_FIELDS)}')
  if model.get('scan_layers'):
    raise _unsupported('model.scan_layers', True, 'the unrolled native layout (False)')
  if model['stem'] not in ('conv', 'aape'):
    raise _unsupported('model.stem', model['stem'], ('conv', 'aape'))
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
    raise _unsupported(
      f'preprocessor.{key}', preset[key], f'only the fields {sorted(_PRESET_FIELDS)}'
    )
  if preset['window'] not in _WINDOWS:
    raise _unsupported('preprocessor.window', preset['window'], _WINDOWS)
  if preset['norm_mode'] not in _NORM_MODES:
    raise _unsupported('preprocessor.norm_mode', preset['norm_mode'], _NORM_MODES)


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


class LogMelFrontEnd(nn.Module):
  """Waveforms [B, S] (with true lengths [B]) -> normalised log-mel [B, target_length, mel]."""

  def __init__(self, preset: dict):
    super().__init__()
    self.opts = FrontEndOptions(preset)
    # float64 constants: the spectrum's cancellations need them (see the module docstring).
    self.register_buffer(
      'spectrum_matrix', torch.from_numpy(frame_spectrum_matrix(self.opts)), persistent=False
    )
    self.register_buffer('mel_banks', torch.from_numpy(mel_banks(self.opts)), persistent=False)

  def checked_lengths(self, waveform_bs: torch.Tensor, num_samples_b) -> torch.Tensor:
    """int64 [B] true clip lengths (default: all S samples), each in [0, S]."""
    batch, total = waveform_bs.shape
    if num_samples_b is None:
      return torch.full((batch,), total, dtype=torch.int64, device=waveform_bs.device)
    lengths = torch.as_tensor(num_samples_b, dtype=torch.int64, device=waveform_bs.device)
    lengths = lengths.reshape(-1)
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
    frames_b = torch.where(
      lengths_b >= opts.window_length,
      1 + torch.div(lengths_b - opts.window_length, opts.frame_shift, rounding_mode='floor'),
      0,
    )
    valid_bt = torch.arange(log_mel_btf.shape[1], device=x_bs.device)[None, :] < frames_b[:, None]
    return torch.where(valid_bt[..., None], log_mel_btf, 0.0)

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


def modulation_pooling_matrix(num_t: int, num_bands: int) -> np.ndarray:
  """sblu.modulation_pooling_matrix: float32 [num_t // 2, num_bands] triangular band pooling of
  the non-DC rFFT bins; columns sum to 1."""
  if num_t < 2:
    raise ValueError(f'need at least 2 frames for a modulation spectrum; got T={num_t}.')
  theta_k = 2.0 * np.pi * np.arange(1, num_t // 2 + 1) / num_t
  theta_b = np.pi * (np.arange(num_bands) + 0.5) / num_bands
  width = max(np.pi / num_bands, 2.0 * np.pi / num_t)
  weights = np.maximum(0.0, 1.0 - np.abs(theta_k[:, None] - theta_b[None, :]) / width)
  return (weights / weights.sum(axis=0, keepdims=True)).astype(np.float32)


def _modulation_dft(num_t: int) -> tuple[torch.Tensor, torch.Tensor]:
  """float32 cos/sin matrices [T, T // 2] of rFFT bins 1 .. T // 2 (a real DFT: no complex op)."""
  k = np.arange(1, num_t // 2 + 1)
  angle = 2.0 * np.pi * np.outer(np.arange(num_t), k) / num_t
  return torch.from_numpy(np.cos(angle).astype(np.float32)), torch.from_numpy(
    -np.sin(angle).astype(np.float32)
  )


class LambdaEncoder(nn.Module):
  """aape.LambdaEncoder: log-mel [B, T, F] -> (alpha, omega) [B, G, N]."""

  def __init__(self, aape: dict, patch_t: int, patch_f: int, num_groups: int):
    super().__init__()
    self.num_modes, self.kernel_size = aape['num_modes'], aape['kernel_size']
    self.patch_t, self.patch_f, self.mode = patch_t, patch_f, aape['lambda_mode']
    self.num_bands = aape['num_mod_bands']
    if self.mode == 'fixed':
      self.z_alpha = nn.Parameter(torch.zeros(num_groups, self.num_modes))
      self.z_omega = nn.Parameter(torch.zeros(num_groups, self.num_modes))
      return
    hidden = aape['lambda_hidden']
    self.norm = nn.LayerNorm(self.num_bands, eps=1e-6)  # flax's default epsilon
    self.hidden = nn.Linear(self.num_bands, hidden)
    self.group_embedding = nn.Parameter(torch.zeros(num_groups, hidden))
    self.out = nn.Linear(hidden, 2 * self.num_modes)
    self._tables: dict[tuple, tuple] = {}

  def _table(self, num_t: int, device: torch.device):
    # Constants of the input length, made once per length and device (not parameters).
    key = (num_t, str(device))
    if key not in self._tables:
      cos, sin = _modulation_dft(num_t)
      pool = torch.from_numpy(modulation_pooling_matrix(num_t, self.num_bands))
      self._tables[key] = (cos.to(device), sin.to(device), pool.to(device))
    return self._tables[key]

  def forward(self, x_btf: torch.Tensor, delta):
    batch, num_t, num_f = x_btf.shape
    num_g, num_n = num_f // self.patch_f, self.num_modes
    if self.mode == 'fixed':
      z_alpha = self.z_alpha.expand(batch, num_g, num_n)
      z_omega = self.z_omega.expand(batch, num_g, num_n)
      return constrain_lambda(z_alpha, z_omega, self.kernel_size, self.patch_t, delta)
    u_btg = x_btf.reshape(batch, num_t, num_g, self.patch_f).mean(-1)
    u_btg = u_btg - u_btg.mean(dim=1, keepdim=True)
    cos_tk, sin_tk, pool_kc = self._table(num_t, x_btf.device)
    re_bgk = torch.einsum('btg,tk->bgk', u_btg, cos_tk) / num_t
    im_bgk = torch.einsum('btg,tk->bgk', u_btg, sin_tk) / num_t
    logmag_bgk = torch.log(torch.sqrt(re_bgk * re_bgk + im_bgk * im_bgk) + _LOG_FLOOR)
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
    env = torch.log1p(torch.sqrt(y_re * y_re + y_im * y_im))  # [B, T, G, pf, N]
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


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.einsum('p,d->pd', positions.astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def grid_posemb(dim: int, num_time: int, num_freq: int) -> np.ndarray:
  """posemb.grid_posemb: float32 [num_time * num_freq, dim], time in the first half of the width,
  frequency in the second, flattened time-major. (Each row depends only on its own position, so
  computing num_time rows equals cropping the max_time_patches table.)"""
  if dim % 4:
    raise ValueError(f'2-D sin-cos embedding needs a width divisible by 4, got {dim}.')
  t_emb = _sincos_1d(dim // 2, np.arange(num_time))
  f_emb = _sincos_1d(dim // 2, np.arange(num_freq))
  table = np.concatenate(
    [
      np.broadcast_to(t_emb[:, None, :], (num_time, num_freq, dim // 2)),
      np.broadcast_to(f_emb[None, :, :], (num_time, num_freq, dim // 2)),
    ],
    axis=-1,
  )
  return table.astype(np.float32).reshape(num_time * num_freq, dim)


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
  """Pre-LN transformer block (vit.EncoderBlock; LayerNorm epsilon 1e-6 as timm)."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int):
    super().__init__()
    self.norm1 = nn.LayerNorm(width, eps=1e-6)
    self.attn = Attention(width, num_heads)
    self.norm2 = nn.LayerNorm(width, eps=1e-6)
    self.mlp = Mlp(width, mlp_dim)

  def forward(self, x_bnd, mask_b11n=None):
    x_bnd = x_bnd + self.attn(self.norm1(x_bnd), mask_b11n)
    return x_bnd + self.mlp(self.norm2(x_bnd))


def _native_prefix(torch_name: str) -> str:
  """'blocks.3.attn.query' -> 'blocks_3.attn.query' (flax names unrolled blocks blocks_N)."""
  parts = torch_name.split('.')
  if len(parts) >= 2 and parts[0] == 'blocks':
    parts = [f'blocks_{parts[1]}'] + parts[2:]
  return '.'.join(parts)


class AaSPEncoder(nn.Module):
  """The exported encoder: front end, patch stem, positions, CLS, blocks, final norm, pooling.

  Attributes:
    config: config.json's dict; `model` is its 'model' section.
    preset: preprocessor_config.json's dict.
    front_end: the `LogMelFrontEnd`.
  """

  def __init__(self, config: dict, preset: dict):
    super().__init__()
    model = config['model']
    check_model_config(model)
    self.config, self.model, self.preset = config, model, dict(preset)
    self.front_end = LogMelFrontEnd(preset)
    opts = self.front_end.opts
    self.width, self.patch_t, self.patch_f = model['width'], model['patch_t'], model['patch_f']
    if opts.target_length % self.patch_t or opts.num_mel_bins % self.patch_f:
      raise ValueError(
        f'the window of {opts.target_length} frames x {opts.num_mel_bins} mel bins does not tile '
        f'into {self.patch_t} x {self.patch_f} patches.'
      )
    self.n_freq = opts.num_mel_bins // self.patch_f
    if model['stem'] == 'conv':
      self.stem = ConvPatchStem(self.width, self.patch_t, self.patch_f)
    else:
      self.stem = AaPEStem(self.width, self.patch_t, self.patch_f, opts.num_mel_bins, model['aape'])
    self.cls = nn.Parameter(torch.zeros(1, 1, self.width))
    self.blocks = nn.ModuleList(
      EncoderBlock(self.width, model['num_heads'], model['mlp_dim']) for _ in range(model['depth'])
    )
    self.norm = nn.LayerNorm(self.width, eps=1e-6)
    self.max_time_patches = model['max_time_patches']
    self._posemb: dict[tuple, torch.Tensor] = {}

  # Weights -------------------------------------------------------------------------------------

  def native_parameters(self) -> dict[str, tuple[nn.Parameter, str]]:
    """{native (flax) tensor name: (this module's parameter, conversion)}, conversion being
    'dense' ([in, out] -> [out, in]), 'conv' (HWIO -> OIHW) or 'same'."""
    out = {}
    for name, module in self.named_modules():
      prefix = _native_prefix(name)
      join = (prefix + '.') if prefix else ''
      if isinstance(module, nn.Linear):
        out[join + 'kernel'] = (module.weight, 'dense')
        out[join + 'bias'] = (module.bias, 'same')
      elif isinstance(module, nn.Conv2d):
        out[join + 'kernel'] = (module.weight, 'conv')
        out[join + 'bias'] = (module.bias, 'same')
      elif isinstance(module, nn.LayerNorm):
        out[join + 'scale'] = (module.weight, 'same')
        out[join + 'bias'] = (module.bias, 'same')
      else:
        for pname, param in module.named_parameters(recurse=False):
          out[join + pname] = (param, 'same')
    return out

  def native_shapes(self) -> dict[str, tuple[int, ...]]:
    """{native tensor name: native shape} of the architecture this module was built for."""
    shapes = {}
    for name, (param, kind) in self.native_parameters().items():
      shape = tuple(param.shape)
      if kind == 'dense':
        shape = shape[::-1]
      elif kind == 'conv':
        shape = (shape[2], shape[3], shape[1], shape[0])
      shapes[name] = shape
    return shapes

  def load_native(self, tensors: dict, where: str = 'the tensors') -> None:
    """Copies native-layout arrays in; a missing, extra or mis-shaped tensor raises ValueError
    naming it, its expected shape and `where`."""
    expected = self.native_shapes()
    _compare(
      {k: tuple(np.shape(v)) for k, v in tensors.items()},
      expected,
      where,
      f'the {self.model["stem"]}-stem architecture of config.json',
    )
    with torch.no_grad():
      for name, (param, kind) in self.native_parameters().items():
        array = np.asarray(tensors[name], dtype=np.float32)
        if kind == 'dense':
          array = array.T
        elif kind == 'conv':
          array = array.transpose(3, 2, 0, 1)
        param.copy_(torch.from_numpy(np.array(array, order='C')))

  @classmethod
  def from_pretrained(cls, export_dir: str | os.PathLike) -> AaSPEncoder:
    """The encoder of an aasp-jax export folder, in eval mode, float32, on the CPU.

    Raises:
      FileNotFoundError: for a missing file of the folder.
      ValueError (safetensors_io.ExportFormatError for a bad file): naming the file, and for a
        tensor its name and expected shape; or naming the config field of an unsupported option.
    """
    export_dir = os.fspath(export_dir)
    config_path = os.path.join(export_dir, CONFIG)
    config = _read_json(config_path)
    for key, want in (('format', FORMAT), ('format_version', FORMAT_VERSION), ('layout', LAYOUT)):
      if config.get(key) != want:
        raise safetensors_io.ExportFormatError(
          f'{config_path}: {key} is {config.get(key)!r}; this reader handles {want!r}.'
        )
    if not isinstance(config.get('model'), dict) or not isinstance(config.get('tensors'), dict):
      raise safetensors_io.ExportFormatError(
        f"{config_path}: needs the 'model' and 'tensors' sections."
      )
    preset = _read_json(os.path.join(export_dir, PREPROCESSOR))
    weights_path = os.path.join(export_dir, WEIGHTS)
    if not os.path.isfile(weights_path):
      raise FileNotFoundError(f'{weights_path}: missing (every export folder has {WEIGHTS}).')
    tensors, _ = safetensors_io.load(weights_path)
    _compare(
      {k: v.shape for k, v in tensors.items()},
      {k: tuple(v) for k, v in config['tensors'].items()},
      weights_path,
      f"{config_path}'s 'tensors'",
    )
    model = cls(config, preset)
    # config.json's list must itself be the architecture its 'model' section describes.
    _compare(
      {k: tuple(v) for k, v in config['tensors'].items()},
      model.native_shapes(),
      f"{config_path}'s 'tensors'",
      f"the architecture of {config_path}'s 'model' section",
    )
    model.load_native(tensors, weights_path)
    return model.eval()

  # Forward -------------------------------------------------------------------------------------

  def _positions(self, n_time: int) -> torch.Tensor:
    if n_time > self.max_time_patches:
      raise ValueError(
        f'input has {n_time} time patches but the position table holds {self.max_time_patches}.'
      )
    key = (n_time, str(self.cls.device))
    if key not in self._posemb:
      table = torch.from_numpy(grid_posemb(self.width, n_time, self.n_freq))
      self._posemb[key] = table.to(self.cls.device)
    return self._posemb[key]

  def forward(self, log_mel_btf: torch.Tensor, token_valid=None) -> dict[str, torch.Tensor]:
    """Encodes normalised log-mel [B, T, mel] (T a multiple of patch_t).

    Args:
      log_mel_btf: float log-mel, e.g. from `features`.
      token_valid: optional bool [B, n_time * n_freq] (time-major); False marks padding that no
        token may attend to.

    Returns:
      {'cls': [B, D], 'tokens': [B, n_time * n_freq, D]} after the final norm.
    """
    x_btf = torch.as_tensor(log_mel_btf, dtype=torch.float32, device=self.cls.device)
    grid_btfd = self.stem(x_btf)
    batch, n_time, n_freq, width = grid_btfd.shape
    tokens_bnd = grid_btfd.reshape(batch, n_time * n_freq, width) + self._positions(n_time)
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
    for block in self.blocks:
      x_bnd = block(x_bnd, mask)
    x_bnd = self.norm(x_bnd)
    return {'cls': x_bnd[:, 0], 'tokens': x_bnd[:, 1:]}

  def features(self, waveform_bs: torch.Tensor, num_samples_b=None) -> torch.Tensor:
    """Normalised log-mel [B, target_length, mel] of waveforms [B, S] at the preset's sample rate
    (zero-padded to S; true lengths `num_samples_b` [B], default S)."""
    return self.front_end(waveform_bs, num_samples_b)

  def token_valid(self, num_samples_b) -> torch.Tensor:
    """bool [B, n_time * n_freq]: a time patch is valid if it holds a frame of the clip."""
    opts = self.front_end.opts
    n = torch.as_tensor(num_samples_b, dtype=torch.int64, device=self.cls.device).reshape(-1)
    frames = torch.where(
      n >= opts.window_length,
      1 + torch.div(n - opts.window_length, opts.frame_shift, rounding_mode='floor'),
      0,
    )
    n_time = opts.target_length // self.patch_t
    time_valid = torch.arange(n_time, device=n.device)[None, :] * self.patch_t < frames[:, None]
    return time_valid.repeat_interleave(self.n_freq, dim=1)

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


def _read_json(path: str) -> dict:
  return safetensors_io.read_json_object(path, f'{CONFIG}, {PREPROCESSOR} and the weights')


def _compare(got: dict, want: dict, got_what: str, want_what: str) -> None:
  """Raises ExportFormatError naming the first missing / extra / mis-shaped tensor."""
  for name in sorted(want):
    if name not in got:
      raise safetensors_io.ExportFormatError(
        f'tensor {name!r} (expected shape {list(want[name])}, as {want_what}) is missing from '
        f'{got_what}.'
      )
  for name in sorted(got):
    if name not in want:
      raise safetensors_io.ExportFormatError(
        f'tensor {name!r} (shape {list(got[name])}) in {got_what} is not one {want_what} has.'
      )
    if tuple(got[name]) != tuple(want[name]):
      raise safetensors_io.ExportFormatError(
        f'tensor {name!r} has shape {list(got[name])} in {got_what}, but {want_what} expected '
        f'shape {list(want[name])}.'
      )
