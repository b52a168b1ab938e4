"""Pre-trained encoders for evaluation: the encoder of a training checkpoint, or a random one.

A checkpoint is named by any of: the run's workdir (its newest complete checkpoint is used), the
workdir's `checkpoints/` folder, or one step's folder `checkpoints/<step>`. Only the run's own
files are read: the config saved next to the arrays rebuilds the encoder and its front end, so no
config file or command line has to be kept alongside a checkpoint.

  from aasp_jax.evaluate import pretrained
  model = pretrained.load_pretrained('runs/quickstart')         # the EMA teacher, as in EAT
  model = pretrained.load_pretrained('runs/quickstart', which='student', step=200)
  model = pretrained.random_encoder(model.config, seed=3)        # the same encoder, untrained
"""

import dataclasses
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from aasp_jax import checkpointing, configuration
from aasp_jax.audio import presets as presets_lib
from aasp_jax.models import build, vit

WHICH = ('teacher', 'student')


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A frozen encoder with everything needed to feed it.

  Attributes:
    config: the run's resolved config (locked).
    encoder: the encoder module (no stochastic depth: evaluation is deterministic).
    params: its parameters, unboxed numpy arrays on the host.
    preset: the front end it was trained with; `preset.target_length` is its input window.
    step: the training step of the checkpoint (0 for a random encoder).
    source: where it came from (a step folder, or 'random(seed=N)').
    which: 'teacher' or 'student' ('random' for a random encoder).
    origin: for imported weights (timm / Audio-MAE / EAT), what they are; None for AaSP runs.
  """

  config: ConfigDict
  encoder: nn.Module
  params: dict
  preset: presets_lib.FrontEndPreset
  step: int
  source: str
  which: str
  origin: str | None = None

  @property
  def width(self) -> int:
    return self.config.model.width


def find_checkpoint(path: str, step: int | None = None) -> tuple[str, int]:
  """(the `checkpoints/` folder, step) that `path` (and `step`) names; clear errors otherwise.

  Without `step`, the newest complete checkpoint (`load_pretrained` falls back to older ones if
  it is damaged).
  """
  directory, steps, _ = checkpoint_candidates(path, step)
  return directory, steps[0]


def checkpoint_candidates(path: str, step: int | None) -> tuple[str, list[int], bool]:
  """(the `checkpoints/` folder, the steps to try newest first, whether the step was named)."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f'{path}: no such checkpoint folder (give a workdir, its checkpoints/ '
      'folder, or a checkpoints/<step> folder).'
    )
  name = os.path.basename(path.rstrip(os.sep))
  if name.isdigit() and os.path.isdir(os.path.join(path, checkpointing.STATE)):
    if step is not None and step != int(name):
      raise ValueError(f'{path} is the checkpoint of step {name}, but step={step} was asked for.')
    return os.path.dirname(path), [int(name)], True
  directory = path if name == 'checkpoints' else os.path.join(path, 'checkpoints')
  steps = checkpointing.complete_steps(directory)
  if not steps:
    raise FileNotFoundError(
      f'{path}: no complete checkpoint in {directory} (a training run writes them there; '
      'unfinished saves are never used).'
    )
  if step is None:
    return directory, steps[::-1], False
  if step not in steps:
    raise ValueError(f'{directory} has no checkpoint of step {step}; it has steps {steps}.')
  return directory, [step], True


def config_from_json(saved: dict) -> ConfigDict:
  """The saved resolved config as a locked ConfigDict (JSON lists stay lists; sizes are ints)."""
  cfg = ConfigDict(saved)
  cfg.lock()
  return cfg


def saved_config(path: str, step: int | None = None) -> tuple[dict, int]:
  """(the resolved config saved with a checkpoint, its step): one small JSON file, no arrays.

  Without `step`, the newest checkpoint whose config reads (a run's checkpoints share it).
  """
  directory, steps, explicit = checkpoint_candidates(path, step)
  failures = []
  for s in steps:
    try:
      return checkpointing.read_config(os.path.join(directory, str(s))), s
    except checkpointing.UnusableCheckpoint as e:
      failures.append(skip_unusable(e, explicit, directory))
  raise none_usable(directory, failures)


def skip_unusable(e: checkpointing.UnusableCheckpoint, explicit: bool, directory: str) -> str:
  """A damaged checkpoint: an error if it was asked for by step, else a warning (and a line for
  the error raised if no checkpoint is usable). Readers never move files."""
  if explicit:
    raise ValueError(
      f'{e}. Choose another step of {directory} ({checkpointing.complete_steps(directory)}), '
      'or give no step to use the newest one that verifies.'
    ) from None
  logging.warning('checkpoint %s is unusable: %s; trying the previous one', e.step_dir, e.reason)
  return f'step {os.path.basename(e.step_dir)}: {e.reason}'


def none_usable(directory: str, failures: list[str]) -> ValueError:
  steps = checkpointing.complete_steps(directory) if os.path.isdir(directory) else []
  if any(os.path.isdir(os.path.join(directory, str(s), checkpointing.ORIGIN)) for s in steps):
    # Imported weights (timm_layout.write_encoder_checkpoint): there is no training to rerun.
    what = 'import the weights again into a new workdir'
  else:
    what = 'rerun training (it sets damaged checkpoints aside and resumes from the newest good one)'
  return checkpointing.NoUsableCheckpoint(
    f'No usable checkpoint in {directory}: {"; ".join(failures)}. The files are damaged; {what}.'
  )


# The item a fine-tuning run adds to its checkpoints (aasp_jax/finetune/checkpoint.py).
FINETUNED_ITEM = 'classifier'


def load_pretrained(path: str, which: str = 'teacher', step: int | None = None) -> Pretrained:
  """The encoder of a training checkpoint on the host.

  The arrays are restored onto this process's first device, whatever mesh or number of processes
  wrote them, and checked against the checksums saved with them. Without `step`, a damaged newest
  checkpoint is skipped (one warning) for the newest one that verifies; a named step must verify.

  Args:
    path: a workdir, its `checkpoints/` folder, or a `checkpoints/<step>` folder.
    which: 'teacher' (the EMA encoder, the default as in EAT) or 'student'.
    step: a specific step (default: the newest complete checkpoint).
  """
  if which not in WHICH:
    raise ValueError(f'which={which!r}: choose one of {WHICH}.')
  directory, steps, explicit = checkpoint_candidates(path, step)
  if any(os.path.isdir(os.path.join(directory, str(s), FINETUNED_ITEM)) for s in steps):
    raise ValueError(
      f'{path} is a fine-tuning run (its checkpoints hold a classifier), not a pre-training one: '
      'aasp-predict and aasp-export take it; give this command a pre-training workdir.'
    )
  failures = []
  for s in steps:
    step_dir = os.path.join(directory, str(s))
    try:
      contents = checkpointing.read_step(
        step_dir, lambda saved: _encoder_item(saved, which), partial=True
      )
    except checkpointing.UnusableCheckpoint as e:
      failures.append(skip_unusable(e, explicit, directory))
      continue
    except configuration.ConfigError as e:
      raise ValueError(f'The saved encoder does not match its saved config: {e}') from None
    return _pretrained(contents, which, s, step_dir)
  raise none_usable(directory, failures)


def _encoder_item(saved: dict, which: str) -> dict:
  """What to restore: only the chosen encoder (the optimizer moments and the other copy stay on
  disk), onto this process's first device."""
  config = config_from_json(saved)
  encoder = build.build_encoder(config.model, drop_path=0.0)
  target = encoder_target(encoder, configuration.input_shape(config))
  return {'train': {'teacher': target} if which == 'teacher' else {'params': {'encoder': target}}}


def _pretrained(contents, which: str, step: int, step_dir: str) -> Pretrained:
  config = config_from_json(contents.config)
  restored = contents.tree['train']
  params = restored['teacher'] if which == 'teacher' else restored['params']['encoder']
  params = jax.tree.map(np.asarray, params)
  if config.model.scan_layers:
    # Evaluation, fine-tuning and export use the unrolled layout ('blocks_0', ...), whose per-layer
    # names they address; the two layouts compute the same function.
    params = jax.tree.map(np.asarray, vit.unstack_blocks(params, config.model.depth))
    with config.unlocked():
      config.model.scan_layers = False
  encoder = build.build_encoder(config.model, drop_path=0.0)
  origin = None
  if os.path.isdir(os.path.join(step_dir, checkpointing.ORIGIN)):  # an imported encoder
    origin = checkpointing.read_item(step_dir, checkpointing.ORIGIN).get('imported_from')
  return Pretrained(
    config=config,
    encoder=encoder,
    params=params,
    preset=configuration.frontend_preset(config),
    step=step,
    source=step_dir,
    which=which,
    origin=origin,
  )


def encoder_target(encoder: nn.Module, shape: tuple[int, int, int]):
  """The encoder's parameter shapes for log-mel input `shape` [1, frames, mel], on this
  process's first device: what orbax restores into."""
  abstract = jax.eval_shape(
    lambda r: encoder.init(r, jnp.zeros(shape, jnp.float32))['params'], jax.random.key(0)
  )
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nn.meta.unbox(abstract)
  )


def random_encoder(config: ConfigDict, seed: int = 0) -> Pretrained:
  """The encoder `config` describes at random initialisation (seed -> the init key).

  Always in the unrolled layout, like `load_pretrained` (model.scan_layers is turned off).
  """
  if config.model.get('scan_layers', False):
    config = ConfigDict(config.to_dict())
    config.model.scan_layers = False
    config.lock()
  encoder = build.build_encoder(config.model, drop_path=0.0)
  shape = configuration.input_shape(config)
  params = jax.jit(lambda r: encoder.init(r, jnp.zeros(shape, jnp.float32))['params'])(
    jax.random.key(seed)
  )
  return Pretrained(
    config=config,
    encoder=encoder,
    params=jax.tree.map(np.asarray, nn.meta.unbox(params)),
    preset=configuration.frontend_preset(config),
    step=0,
    source=f'random(seed={seed})',
    which='random',
  )


def initial_encoder(config: ConfigDict) -> Pretrained:
  """The encoder a training run with `config` starts from (step 0 of `aasp-pretrain`): the same
  init key as the trainer (`jax.random.split(jax.random.key(config.seed))[0]` through the
  objective's `init_params`), so a pre-trained encoder can be paired with its own initialisation.
  """
  from aasp_jax.train.objective import AaSPObjective  # the trainer's init; a late import

  init_rng = jax.random.split(jax.random.key(config.seed))[0]
  params = nn.meta.unbox(AaSPObjective.from_config(config).init_params(init_rng)['encoder'])
  if config.model.get('scan_layers', False):
    params = vit.unstack_blocks(params, config.model.depth)
    config = ConfigDict(config.to_dict())
    config.model.scan_layers = False
    config.lock()
  return Pretrained(
    config=config,
    encoder=build.build_encoder(config.model, drop_path=0.0),
    params=jax.tree.map(np.asarray, params),
    preset=configuration.frontend_preset(config),
    step=0,
    source=f'initialisation(seed={config.seed})',
    which='initialisation',
  )
