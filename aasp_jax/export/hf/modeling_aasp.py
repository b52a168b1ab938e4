"""Hugging Face transformers models around the AaSP encoder of `aasp_torch` (the same module).

  from transformers import AutoFeatureExtractor, AutoModel
  extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
  model = AutoModel.from_pretrained(folder, trust_remote_code=True)      # AaSPModel
  out = model(**extractor(waveforms, sampling_rate=16000, return_tensors='pt'))
  out.scene, out.cls, out.tokens
  model.embed(waveforms_bs, lengths)['scene']   # clips longer than a window: HEAR's scene

The padding rule is the project's: the extractor's `attention_mask` marks the frames of each clip,
and the time patches with none of them are masked as attention keys and left out of the scene's
token mean (so `scene` equals aasp_jax.evaluate.hear.get_scene_embeddings for a clip up to one
window). `forward` reads one window; `embed` cuts longer clips into windows as HEAR does.

Classification exports also load with `AutoModelForAudioClassification` (`.logits`). The weights
are `aasp_torch.AaSPEncoder`'s state dict under 'encoder.' (plus 'classifier.*'), so
`save_pretrained` writes a folder that `aasp_torch` reads too.
"""

import dataclasses

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ModelOutput, SequenceClassifierOutput

try:  # inside a package: an export loaded with trust_remote_code, or aasp_jax.export.hf
  from .aasp_torch import AaSPEncoder
  from .configuration_aasp import AaSPConfig
except ImportError:
  if __package__:
    raise
  from aasp_torch import AaSPEncoder  # the export folder on sys.path
  from configuration_aasp import AaSPConfig


@dataclasses.dataclass
class AaSPModelOutput(ModelOutput):
  """AaSPModel's outputs.

  Attributes:
    scene: [B, 2D] CLS ++ the mean of the (valid) patch tokens: the scene embedding of a window.
    cls: [B, D] the CLS token after the encoder.
    tokens: [B, n_time * n_freq, D] the patch tokens, time-major.
  """

  scene: torch.FloatTensor | None = None
  cls: torch.FloatTensor | None = None
  tokens: torch.FloatTensor | None = None


class AaSPPreTrainedModel(PreTrainedModel):
  """Loading glue shared by the AaSP models."""

  config_class = AaSPConfig
  base_model_prefix = 'aasp'
  main_input_name = 'input_values'

  def _init_weights(self, module):
    # transformers builds the model on the meta device and loads the weights into it; the constant
    # tables (front-end matrices, fixed positions) are not weights, so they are recomputed here.
    reset = getattr(module, 'reset_constants', None)
    if callable(reset):
      reset()
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
      super()._init_weights(module)

  def _encoder(self, config: AaSPConfig) -> AaSPEncoder:
    if not config.model or not config.frontend:
      raise ValueError("AaSPConfig needs the 'model' and 'frontend' sections of an aasp export.")
    return AaSPEncoder(config.model, config.frontend)


class AaSPModel(AaSPPreTrainedModel):
  """The AaSP encoder: normalised log-mel `input_values` [B, T, mel] -> scene, cls, tokens."""

  def __init__(self, config: AaSPConfig):
    super().__init__(config)
    self.encoder = self._encoder(config)
    self.post_init()

  def forward(
    self, input_values, attention_mask=None, token_valid=None, return_dict=None, **kwargs
  ):
    """Encodes log-mel windows (T a multiple of patch_t).

    Args:
      input_values: normalised log-mel [B, T, mel] (the feature extractor's).
      attention_mask: [B, T], 1 for the frames of the clip (the feature extractor's); the time
        patches with no such frame are masked as attention keys and left out of the scene mean.
      token_valid: or the mask over the patches directly, bool [B, n_time * n_freq].
    """
    if token_valid is None and attention_mask is not None:
      token_valid = self.encoder.token_valid_of_frames(attention_mask)
    out = self.encoder(input_values, token_valid)
    scene = self.encoder.scene(out, token_valid)
    if return_dict is False:
      return scene, out['cls'], out['tokens']
    return AaSPModelOutput(scene=scene, cls=out['cls'], tokens=out['tokens'])

  def embed(self, waveform_bs, num_samples_b=None, batch_size: int = 8):
    """Scene and frame embeddings of clips of any length (`aasp_torch.AaSPEncoder.embed`)."""
    return self.encoder.embed(waveform_bs, num_samples_b, batch_size)


class AaSPForAudioClassification(AaSPPreTrainedModel):
  """The fine-tuned AaSP classifier: logits = classifier(encoder(input_values).cls)."""

  def __init__(self, config: AaSPConfig):
    super().__init__(config)
    self.encoder = self._encoder(config)
    self.classifier = nn.Linear(self.encoder.width, config.num_labels)
    self.post_init()

  def forward(
    self, input_values, attention_mask=None, labels=None, token_valid=None, return_dict=None,
    **kwargs,
  ):
    """Logits [B, num_labels]; with `labels`, the loss of `config.problem_type` (cross-entropy on
    class indices, or binary cross-entropy on multi-hot targets).

    `attention_mask` (the feature extractor's) is accepted and not applied: a fine-tuned classifier
    was trained and evaluated on the zero-padded window with the padding visible, and it reads
    clips the same way here, as `aasp-predict` (JAX, torch, ONNX) does. `token_valid` masks
    patches explicitly if given."""
    del attention_mask
    logits = self.classifier(self.encoder(input_values, token_valid)['cls'])
    loss = None
    if labels is not None:
      labels = torch.as_tensor(labels, device=logits.device)
      if self.config.problem_type == 'multi_label_classification':
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
      else:
        loss = nn.functional.cross_entropy(logits, labels.long())
    if return_dict is False:
      return (logits,) if loss is None else (loss, logits)
    return SequenceClassifierOutput(loss=loss, logits=logits)
