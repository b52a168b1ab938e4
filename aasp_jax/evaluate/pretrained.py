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
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
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
  """

  config: ConfigDict
  encoder: nn.Module
  params: dict
  preset: presets_lib.FrontEndPreset
  step: int
  source: str
  which: str

  @property
  def width(self) -> int:
    return self.config.model.width


def find_checkpoint(path: str, step: int | None = None) -> tuple[str, int]:
  """(the `checkpoints/` folder, step) that `path` (and `step`) names; clear errors otherwise."""
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
    return os.path.dirname(path), int(name)
  directory = path if name == 'checkpoints' else os.path.join(path, 'checkpoints')
  steps = _complete_steps(directory)
  if not steps:
    raise FileNotFoundError(
      f'{path}: no complete checkpoint in {directory} (a training run writes them there; '
      'unfinished saves are never used).'
    )
  if step is None:
    return directory, steps[-1]
  if step not in steps:
    raise ValueError(f'{directory} has no checkpoint of step {step}; it has steps {steps}.')
  return directory, step


def _complete_steps(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(
    int(n)
    for n in os.listdir(directory)
    if n.isdigit() and os.path.isdir(os.path.join(directory, n, checkpointing.STATE))
  )


def config_from_json(saved: dict) -> ConfigDict:
  """The saved resolved config as a locked ConfigDict (JSON lists stay lists; sizes are ints)."""
  cfg = ConfigDict(saved)
  cfg.lock()
  return cfg


def load_pretrained(path: str, which: str = 'teacher', step: int | None = None) -> Pretrained:
  """The encoder of a training checkpoint on the host.

  Args:
    path: a workdir, its `checkpoints/` folder, or a `checkpoints/<step>` folder.
    which: 'teacher' (the EMA encoder, the default as in EAT) or 'student'.
    step: a specific step (default: the newest complete checkpoint).
  """
  if which not in WHICH:
    raise ValueError(f'which={which!r}: choose one of {WHICH}.')
  directory, step = find_checkpoint(path, step)
  manager = ocp.CheckpointManager(
    directory,
    item_handlers={
      checkpointing.STATE: ocp.PyTreeCheckpointHandler(),  # partial restore
      checkpointing.CONFIG: ocp.JsonCheckpointHandler(),
    },
  )
  try:
    saved = manager.restore(
      step, args=ocp.args.Composite(**{checkpointing.CONFIG: ocp.args.JsonRestore()})
    )[checkpointing.CONFIG]
    config = config_from_json(saved)
    encoder = build.build_encoder(config.model, drop_path=0.0)
    target = _encoder_target(encoder, config)
    # Only the chosen encoder is read: the optimizer moments and the other copy stay on disk.
    item = {'train': {'teacher': target} if which == 'teacher' else {'params': {'encoder': target}}}
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        **{checkpointing.STATE: ocp.args.PyTreeRestore(item=item, partial_restore=True)}
      ),
    )[checkpointing.STATE]['train']
  finally:
    manager.close()
  params = restored['teacher'] if which == 'teacher' else restored['params']['encoder']
  params = jax.tree.map(np.asarray, params)
  _check_shapes(params, target, os.path.join(directory, str(step)))
  if config.model.scan_layers:
    # Evaluation, fine-tuning and export use the unrolled layout ('blocks_0', ...), whose per-layer
    # names they address; the two layouts compute the same function.
    params = jax.tree.map(np.asarray, vit.unstack_blocks(params, config.model.depth))
    with config.unlocked():
      config.model.scan_layers = False
    encoder = build.build_encoder(config.model, drop_path=0.0)
  return Pretrained(
    config=config,
    encoder=encoder,
    params=params,
    preset=configuration.frontend_preset(config),
    step=step,
    source=os.path.join(directory, str(step)),
    which=which,
  )


def _encoder_target(encoder: nn.Module, config: ConfigDict):
  """Host numpy arrays of the encoder's shapes: what orbax restores into (no device sharding)."""
  shape = configuration.input_shape(config)
  abstract = jax.eval_shape(
    lambda r: encoder.init(r, jnp.zeros(shape, jnp.float32))['params'], jax.random.key(0)
  )
  return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), nn.meta.unbox(abstract))


def _check_shapes(params, target, where: str) -> None:
  got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(target)}
  if got != want:
    diff = sorted(set(got.items()) ^ set(want.items()))[:5]
    raise ValueError(f'{where}: the saved encoder does not match its saved config: {diff}')


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
