"""The fine-tuned classifier in a run's checkpoints: what is saved with it, and loading it back.

A fine-tuning run writes `<workdir>/checkpoints/<step>` with `checkpointing.RunCheckpoints`, so
it has pre-training's orbax layout, checksums and crash safety. The items are:
  state          {'train': FinetuneState (step, params {'encoder', 'head'}, opt_state), 'rng'}
  data_position  the training stream's place (`data.TrainStream.position`) and the step
  checksums      of every array in `state`
  config         the fine-tuning config
  classifier     what a user of the model needs without that config: the label names, multilabel,
                 the encoder's `model` config (unrolled layout), the front end with the fine-tuning
                 `target_length`, and the encoder the run started from.

  from aasp_jax.finetune import checkpoint
  model = checkpoint.load_finetuned('runs/ft_esc50')  # the newest checkpoint that verifies
  logits_bc = checkpoint.logits(model, checkpoint.features(model, waveform_bs, num_samples_b))

`load_finetuned` restores only the encoder and the head (no optimizer moments) onto this process's
first device, whatever mesh or number of devices wrote them, and checks them against the saved
checksums. A damaged newest checkpoint is skipped (one warning) for the newest one that verifies.
"""

import dataclasses
import functools
import json
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from aasp_jax import checkpointing, configuration
from aasp_jax.audio import fbank_device
from aasp_jax.audio import presets as presets_lib
from aasp_jax.evaluate import pretrained
from aasp_jax.finetune import step as step_lib
from aasp_jax.models import build

CLASSIFIER = pretrained.FINETUNED_ITEM  # the checkpoint item ('classifier')
FORMAT = 'aasp-jax-classifier'
FORMAT_VERSION = 1
HEAD = 'Dense_0'  # the head's Dense inside `step.ClsHead`


def classifier_item(
  labels,
  multilabel: bool,
  model_cfg: ConfigDict,
  preset: presets_lib.FrontEndPreset,
  init: dict,
  data: str | None = None,
) -> dict:
  """The `classifier` item a fine-tuning run saves with every checkpoint (JSON); `data` names the
  labelled set it was fine-tuned on (an export's card shows it)."""
  return {
    'data': data,
    'format': FORMAT,
    'format_version': FORMAT_VERSION,
    'labels': [str(label) for label in labels],
    'multilabel': bool(multilabel),
    'model': json.loads(model_cfg.to_json()),
    'preset': preset.to_dict(),
    'init': init,
  }


@dataclasses.dataclass(frozen=True)
class Finetuned:
  """A fine-tuned classifier on the host.

  Attributes:
    model_config: the encoder's `model` section (as `exporter.write_export` takes it; unrolled).
    preset: the front end, with the fine-tuning `target_length` (the window it classifies).
    encoder_params: the encoder's parameters, a nested dict of numpy arrays.
    head_params: {'kernel': [D, C], 'bias': [C]} numpy arrays of the linear head on the CLS token.
    labels: the class names, in the order of the logits.
    multilabel: sigmoid scores per class (True) or a softmax over the classes (False).
    step: the fine-tuning step of the checkpoint.
    source: the run's folder name.
    data: the labelled set it was fine-tuned on (dataset name and root), if saved.
    origin: for an encoder imported from timm / Audio-MAE / EAT weights, what they were.
  """

  model_config: dict
  preset: presets_lib.FrontEndPreset
  encoder_params: dict
  head_params: dict
  labels: tuple[str, ...]
  multilabel: bool
  step: int
  source: str
  data: str | None = None
  origin: str | None = None

  @functools.cached_property
  def classifier(self) -> step_lib.Classifier:
    """The fine-tuning model (encoder + head) without stochastic depth: `logits` applies it.

    It computes in float32 whatever compute dtype fine-tuning used (bf16 by default), as the
    exported PyTorch and ONNX models do, so the three backends of aasp-predict agree.
    """
    model = ConfigDict(dict(self.model_config, dtype='float32'))
    model.lock()
    return step_lib.Classifier(build.build_encoder(model, drop_path=0.0), len(self.labels))

  @functools.cached_property
  def device_params(self) -> dict:
    """{'encoder', 'head'} as `classifier` takes them, on this process's first device."""
    params = {'encoder': self.encoder_params, 'head': {HEAD: self.head_params}}
    return jax.device_put(params, jax.local_devices()[0])


def _steps(path) -> tuple[str, list[int], bool] | None:
  try:
    return pretrained.checkpoint_candidates(os.fspath(path), None)
  except (OSError, ValueError):
    return None


def is_finetuned(path) -> bool:
  """Whether `path` (a fine-tuning workdir, its `checkpoints/` folder or one step's folder) holds
  a complete fine-tuned classifier checkpoint. Never raises."""
  found = _steps(path)
  if found is None:
    return False
  directory, steps, _ = found
  return any(os.path.isdir(os.path.join(directory, str(s), CLASSIFIER)) for s in steps)


def load_finetuned(path, step: int | None = None) -> Finetuned:
  """The fine-tuned classifier of a checkpoint (see the module docstring).

  Args:
    path: a fine-tuning workdir, its `checkpoints/` folder or a `checkpoints/<step>` folder.
    step: a specific step (default: the newest complete checkpoint that verifies).

  Raises:
    FileNotFoundError: no checkpoint there.
    ValueError: a pre-training checkpoint (no classifier), a named step that is damaged, or no
      usable checkpoint at all (the message says why for each).
  """
  directory, steps, explicit = pretrained.checkpoint_candidates(os.fspath(path), step)
  with_head = [s for s in steps if os.path.isdir(os.path.join(directory, str(s), CLASSIFIER))]
  if not with_head:
    raise ValueError(
      f'{path} holds no fine-tuned classifier (no {CLASSIFIER!r} item in {directory}): it is a '
      'pre-training checkpoint. Fine-tune it first (aasp-finetune --config.init_checkpoint='
      f"{path} ...) and give that run's workdir."
    )
  failures = []
  for s in with_head:
    step_dir = os.path.join(directory, str(s))
    try:
      item = checkpointing.read_item(step_dir, CLASSIFIER)
      _check_item(item, step_dir)
      contents = checkpointing.read_step(step_dir, lambda _, item=item: _target(item), partial=True)
    except checkpointing.UnusableCheckpoint as e:
      failures.append(pretrained.skip_unusable(e, explicit, directory))
      continue
    except configuration.ConfigError as e:
      raise ValueError(f'The saved classifier does not match its saved config: {e}') from None
    params = jax.tree.map(np.asarray, contents.tree['train']['params'])
    logging.info('fine-tuned classifier: step %d of %s (checksums verified)', s, directory)
    return Finetuned(
      model_config=item['model'],
      preset=presets_lib.FrontEndPreset.from_dict(item['preset']),
      encoder_params=params['encoder'],
      head_params=dict(params['head'][HEAD]),
      labels=tuple(item['labels']),
      multilabel=bool(item['multilabel']),
      step=s,
      source=os.path.basename(os.path.dirname(directory)),
      data=item.get('data'),
      origin=(item.get('init') or {}).get('origin'),
    )
  raise pretrained.none_usable(directory, failures)


def saved_model_config(path, step: int | None = None) -> dict:
  """The encoder's `model` section saved with a fine-tuned classifier: one small JSON item, no
  arrays (of the newest checkpoint with a classifier, or `step`)."""
  directory, steps, _ = pretrained.checkpoint_candidates(os.fspath(path), step)
  failures = []
  for s in steps:
    step_dir = os.path.join(directory, str(s))
    if not os.path.isdir(os.path.join(step_dir, CLASSIFIER)):
      continue
    try:
      item = checkpointing.read_item(step_dir, CLASSIFIER)
      _check_item(item, step_dir)
    except checkpointing.UnusableCheckpoint as e:
      failures.append(f'step {s}: {e.reason}')
      continue
    return item['model']
  raise ValueError(f'{path}: no readable fine-tuned classifier ({"; ".join(failures) or "none"}).')


def _check_item(item: dict, step_dir: str) -> None:
  if item.get('format') != FORMAT or item.get('format_version') != FORMAT_VERSION:
    raise checkpointing.UnusableCheckpoint(
      step_dir,
      f'{CLASSIFIER}: format {item.get("format")!r} version {item.get("format_version")!r}; this '
      f'reader handles {FORMAT!r} version {FORMAT_VERSION}',
    )
  missing = [k for k in ('labels', 'multilabel', 'model', 'preset') if k not in item]
  if missing:
    raise checkpointing.UnusableCheckpoint(step_dir, f'{CLASSIFIER}: missing {missing}')


def _target(item: dict) -> dict:
  """What to restore: the encoder and the head, onto this process's first device (the optimizer
  moments, step and key stay on disk)."""
  model = ConfigDict(item['model'])
  preset = presets_lib.FrontEndPreset.from_dict(item['preset'])
  encoder = build.build_encoder(model, drop_path=0.0)
  shape = (1, preset.target_length, preset.num_mel_bins)
  num_classes = len(item['labels'])
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  head = {
    'kernel': jax.ShapeDtypeStruct((model.width, num_classes), jnp.float32, sharding=device),
    'bias': jax.ShapeDtypeStruct((num_classes,), jnp.float32, sharding=device),
  }
  encoder_params = pretrained.encoder_target(encoder, shape)
  return {'train': {'params': {'encoder': encoder_params, 'head': {HEAD: head}}}}


# Using it.


@functools.partial(jax.jit, static_argnums=0)
def _features(preset, waveform_bs, num_samples_b):
  return fbank_device.features(waveform_bs, preset, num_samples_b)


def log_mel(preset: presets_lib.FrontEndPreset, waveform_bs, num_samples_b) -> jax.Array:
  """The normalised log-mel [B, target_length, mel] of each waveform's first window (from its
  start, zero-padded), as fine-tuning's evaluation computes it; `num_samples_b` are the true
  lengths (jitted; one compilation per front end and batch shape)."""
  return _features(preset, waveform_bs, num_samples_b)


def features(finetuned: Finetuned, waveform_bs, num_samples_b) -> jax.Array:
  """`log_mel` with the classifier's front end: what `logits` takes."""
  return _features(finetuned.preset, waveform_bs, num_samples_b)


@functools.partial(jax.jit, static_argnums=0)
def _logits(classifier, params, log_mel_btf):
  with nn.logical_axis_rules(()):
    return classifier.apply({'params': params}, log_mel_btf).astype(jnp.float32)


def logits(finetuned: Finetuned, log_mel_btf) -> jax.Array:
  """Float32 logits [B, C] of log-mel windows [B, target_length, mel] (jitted; one compilation
  per model and batch shape)."""
  return _logits(finetuned.classifier, finetuned.device_params, log_mel_btf)
