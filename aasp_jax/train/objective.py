"""The AaSP model bundle: encoder (student and EMA teacher), predictor and contrastive projection,
plus the static settings of the objective, built once from the config.

`objective.kind` picks the pre-training target behind one interface (same step, loop, state and
checkpoints): 'aasp' predicts the EMA teacher's targets at the masked positions (data2vec 2.0 /
EAT); 'mae' reconstructs the masked patches of the normalised log-mel (Audio-MAE), with the
predictor's output width set to the pixels per patch.
"""

import dataclasses

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from aasp_jax import configuration, later_fields, losses, masking
from aasp_jax.audio import fbank_device
from aasp_jax.audio.presets import FrontEndPreset
from aasp_jax.models import build
from aasp_jax.models import init as init_lib
from aasp_jax.models.heads import ProjectionHead
from aasp_jax.models.vit import LAYER_SOURCES

# The choices of every string-valued objective switch (config key -> valid values).
CHOICES = {
  'kind': ('aasp', 'mae'),
  'loss_scale': losses.LOSS_SCALES,
  'utterance_reduction': losses.UTTERANCE_REDUCTIONS,
  'target_layers': LAYER_SOURCES,
  'stem_input': ('full', 'masked'),
  'init': init_lib.INITS,
  'mask_centres': masking.CENTRE_RULES,
}


@dataclasses.dataclass(frozen=True)
class AaSPObjective:
  """Everything the train step needs besides arrays; hashable, so it can close over a jit."""

  encoder: object
  predictor: object
  projection: ProjectionHead
  preset: FrontEndPreset
  grid: tuple[int, int]
  num_clones: int
  mask_ratio: float
  mask_block_size: int
  top_k_layers: int
  utterance_weight: float
  contrastive_weight: float
  temperature: float
  # The switches below default to the AaSP recipe (see configs/common.py objective_config).
  kind: str = 'aasp'
  loss_scale: str = 'mean'
  utterance_reduction: str = 'mean'
  target_layers: str = 'residual'
  stem_input: str = 'full'
  context_metric: bool = False
  mae_norm_patches: bool = True
  # utterance_reduction='eat': the CLS term's row weight, EAT's clips per GPU (see losses.py).
  eat_clips_per_worker: int = 12
  init: str = 'aasp'  # model.init: 'aasp' | 'eat' (aasp_jax/models/init.py)
  mask_centres: str = 'coverage'  # | 'eat' (masking.eat_num_centres)

  def __post_init__(self):
    for key, choices in CHOICES.items():
      value = getattr(self, key)
      if value not in choices:
        raise ValueError(f'objective.{key}={value!r} is not valid; choose one of {choices}.')

  @classmethod
  def from_config(cls, cfg: ConfigDict) -> 'AaSPObjective':
    m, o = cfg.model, cfg.objective
    preset = configuration.frontend_preset(cfg)
    if not 1 <= o.top_k_layers <= m.depth:
      raise ValueError(
        f'objective.top_k_layers={o.top_k_layers} must be between 1 and model.depth={m.depth}.'
      )
    if o.num_clones < 2 and o.contrastive_weight > 0:
      raise ValueError(
        f'objective.num_clones={o.num_clones}: the multi-mask contrastive loss needs at least 2 '
        'clones per clip; raise num_clones or set objective.contrastive_weight=0.'
      )
    predictor = build.build_predictor(m)
    if o.kind == 'mae':
      # Audio-MAE's decoder predicts the pixels of each masked patch.
      predictor = predictor.clone(out_dim=m.patch_t * m.patch_f)
    return cls(
      encoder=build.build_encoder(m),
      predictor=predictor,
      projection=ProjectionHead(
        o.projection_hidden,
        o.projection_dim,
        build.dtype_of(m.dtype),
        build.dtype_of(m.param_dtype),
      ),
      preset=preset,
      grid=(preset.target_length // m.patch_t, preset.num_mel_bins // m.patch_f),
      num_clones=o.num_clones,
      mask_ratio=o.mask_ratio,
      mask_block_size=o.mask_block_size,
      top_k_layers=o.top_k_layers,
      utterance_weight=o.utterance_weight,
      contrastive_weight=o.contrastive_weight,
      temperature=o.temperature,
      kind=o.kind,
      loss_scale=o.loss_scale,
      utterance_reduction=o.utterance_reduction,
      target_layers=o.target_layers,
      stem_input=o.stem_input,
      context_metric=o.context_metric,
      mae_norm_patches=o.mae_norm_patches,
      # Keys added after checkpoints existed: a config without them means the AaSP defaults.
      eat_clips_per_worker=later_fields.get(o, 'objective.eat_clips_per_worker'),
      init=later_fields.get(m, 'model.init'),
      mask_centres=later_fields.get(o, 'objective.mask_centres'),
    )

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def patch(self) -> tuple[int, int]:
    """(patch_t, patch_f): frames and mel bins per patch token."""
    return (
      self.preset.target_length // self.grid[0],
      self.preset.num_mel_bins // self.grid[1],
    )

  def features(self, batch: dict) -> jax.Array:
    """Normalised log-mel [B, T, F]: computed on device from waveforms, or taken from the batch."""
    if 'log_mel' in batch:
      return batch['log_mel'].astype(jnp.float32)
    return fbank_device.features(batch['waveform'], self.preset, batch.get('num_samples'))

  @property
  def mask_noise(self) -> bool:
    """Whether the predictor fills masked cells with fresh noise each step (EAT's decoder)."""
    return getattr(self.predictor, 'mask_fill', None) == 'noise'

  def draw_mask_noise(self, rng, masked_idx_rk):
    """EAT's decoder fill for the masked cells, [R, K, C] from `rng`; None for other predictors."""
    if not self.mask_noise:
      return None
    return self.predictor.draw_mask_noise(rng, masked_idx_rk, self.encoder.width)

  def init_params(self, rng: jax.Array) -> dict:
    """Student parameters (boxed with logical axes): encoder, predictor and projection head,
    drawn by the modules' initialisers and then redrawn under `init` (models/init.py)."""
    k_enc, k_pred, k_proj = jax.random.split(rng, 3)
    k_init = jax.random.fold_in(rng, 3)  # a fourth stream; the first three keep their draws
    x = jnp.zeros((1, self.preset.target_length, self.preset.num_mel_bins), jnp.float32)
    width = self.encoder.width
    idx = jnp.zeros((1, 1), jnp.int32)
    params = {
      'encoder': self.encoder.init(k_enc, x)['params'],
      'predictor': self.predictor.init(
        k_pred,
        jnp.zeros((1, 1, width), jnp.float32),
        idx,
        idx,
        self.grid,
        **predictor_extras(self.draw_mask_noise(k_pred, idx)),
      )['params'],
      'projection': self.projection.init(k_proj, jnp.zeros((1, width), jnp.float32))['params'],
    }
    return init_lib.apply_init(self.init, params, k_init)


def predictor_extras(mask_noise) -> dict:
  """The predictor call's keyword arguments beyond the shared signature: EAT's decoder noise."""
  return {} if mask_noise is None else {'mask_noise': mask_noise}
