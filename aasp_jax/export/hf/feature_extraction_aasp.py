"""The Hugging Face feature extractor of an AaSP export: waveforms -> normalised log-mel windows.

  extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
  batch = extractor([wave_a, wave_b], sampling_rate=16000, return_tensors='pt')
  batch['input_values']    # [2, target_length, mel]: each clip's first window
  batch['attention_mask']  # [2, target_length] int32: 1 for the frames that hold the clip
  model(**batch)           # AaSPModel masks the rest (attention keys and the scene's mean)

It runs `aasp_torch.LogMelFrontEnd`, the Kaldi log-mel front end of the model: clips of different
lengths are zero-padded to the longest and each is analysed over its own samples (its mean removed,
frames past its end set to the normalised zero), then padded or cropped to `target_length` frames. `attention_mask` marks the frames of the clip
(Kaldi frames with snip_edges: 1 + (samples - window) // shift, capped at `target_length`): the
padding rule of every aasp-jax path (HEAR, the probes, `aasp_torch.AaSPEncoder.embed`, ONNX), under
which time patches with no frame of the clip are neither attended to nor pooled.
preprocessor_config.json holds the preset's fields, with the sample rate as `sampling_rate` and the
number of mel bins as `feature_size` too.
"""

import copy

import numpy as np
import torch
from transformers import BatchFeature, SequenceFeatureExtractor

try:
  from .aasp_torch import LogMelFrontEnd
except ImportError:
  if __package__:
    raise
  from aasp_torch import LogMelFrontEnd

# The preset's fields besides sample_rate (preprocessor_config.json calls it `sampling_rate`).
PRESET_FIELDS = (
  'name frame_length_ms frame_shift_ms round_to_power_of_two num_mel_bins low_freq high_freq '
  'preemphasis remove_dc_offset window log_floor subtract_waveform_mean waveform_scale '
  'target_length norm_mean norm_std norm_mode'.split()
)


class AaSPFeatureExtractor(SequenceFeatureExtractor):
  """Mono waveforms at `sampling_rate` -> `input_values` [B, target_length, feature_size]."""

  model_input_names = ['input_values', 'attention_mask']

  def __init__(self, feature_size=128, sampling_rate=16000, padding_value=0.0, **kwargs):
    missing = [k for k in PRESET_FIELDS if k not in kwargs]
    if missing:
      raise ValueError(f'AaSPFeatureExtractor: the front-end preset lacks {missing}.')
    preset = {k: kwargs.pop(k) for k in PRESET_FIELDS}
    if preset['num_mel_bins'] != feature_size:
      raise ValueError(
        f'AaSPFeatureExtractor: feature_size={feature_size} but num_mel_bins='
        f'{preset["num_mel_bins"]}; they are the same number.'
      )
    kwargs.setdefault('return_attention_mask', True)
    super().__init__(
      feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value, **kwargs
    )
    for key, value in preset.items():
      setattr(self, key, value)
    self._front_end = LogMelFrontEnd(dict(preset, sample_rate=sampling_rate))

  @property
  def preset(self) -> dict:
    """The front-end preset (aasp-jax's field names)."""
    return dict(self._front_end.opts.preset)

  def to_dict(self) -> dict:
    # Every attribute but the torch module (the base class would also drop the preset's 'window').
    out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k != '_front_end'}
    out['feature_extractor_type'] = type(self).__name__
    return out

  def __call__(
    self, raw_speech, sampling_rate=None, return_tensors=None, return_attention_mask=None, **kwargs
  ) -> BatchFeature:
    """Normalised log-mel of each clip's first window, and which of its frames hold the clip.

    Args:
      raw_speech: one mono waveform (1-D array, list of floats or tensor), a list of them, or a
        [B, S] array of equal-length clips, at `sampling_rate` Hz, floats in [-1, 1].
      sampling_rate: the clips' rate; must equal the model's (resample first otherwise).
      return_tensors: 'pt', 'np' or None (lists).
      return_attention_mask: also return `attention_mask` [B, target_length] (default: the
        extractor's `return_attention_mask`, True). Without it the model attends to the padding of
        clips shorter than a window, and its embeddings are not the project's.
    """
    if sampling_rate is not None and sampling_rate != self.sampling_rate:
      raise ValueError(
        f'the audio is at {sampling_rate} Hz but this model takes {self.sampling_rate} Hz; '
        'resample it first.'
      )
    clips = _as_clips(raw_speech)
    batch = np.zeros((len(clips), max(len(c) for c in clips)), np.float32)
    for i, clip in enumerate(clips):
      batch[i, : len(clip)] = clip
    lengths = torch.tensor([len(c) for c in clips])
    with torch.no_grad():
      x_btf = self._front_end(torch.from_numpy(batch), lengths)
    out = {'input_values': x_btf.numpy()}
    if self.return_attention_mask if return_attention_mask is None else return_attention_mask:
      out['attention_mask'] = self._front_end.frame_valid(lengths).numpy().astype(np.int32)
    return BatchFeature(out, tensor_type=return_tensors)


def _as_clips(raw_speech) -> list[np.ndarray]:
  if isinstance(raw_speech, torch.Tensor):
    raw_speech = raw_speech.detach().cpu().numpy()
  if isinstance(raw_speech, np.ndarray):
    if raw_speech.ndim == 1:
      return [raw_speech.astype(np.float32)]
    if raw_speech.ndim == 2:
      return [row.astype(np.float32) for row in raw_speech]
    raise ValueError(f'waveforms must be 1-D or [batch, samples]; got shape {raw_speech.shape}.')
  if isinstance(raw_speech, (list, tuple)) and raw_speech and not np.isscalar(raw_speech[0]):
    clips = [
      np.asarray(c.detach().cpu() if hasattr(c, 'detach') else c, np.float32) for c in raw_speech
    ]
    if any(c.ndim != 1 for c in clips):
      raise ValueError('each waveform of the list must be 1-D (mono).')
    return clips
  return [np.asarray(raw_speech, np.float32)]
