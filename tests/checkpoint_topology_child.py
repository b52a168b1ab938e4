"""Child process for test_checkpoint_topology: train on one topology, read on another.

train WORKDIR [REF.npz] [--coordinator_address=H:P --num_processes=N --process_id=I]
    Pre-trains the tiny config in WORKDIR (`loop.train`; resumes if WORKDIR has checkpoints) on
    this process's devices (XLA_FLAGS), joined to the others by jax.distributed when a
    coordinator is given (launch/local_multiprocess.py passes those flags). With REF.npz, process
    0 then writes what the readers must reproduce, computed from the trained state in memory:
    the teacher's parameters ('param/<name>'), HEAR scene embeddings of fixed noise ('scene') and
    `Embedder.embed_files` embeddings of the fixture audio ('files', 'clip_ids').

load WORKDIR OUT_DIR
    Reads WORKDIR as a user would on this machine: `hear.load_model` (-> OUT_DIR/hear.npz: its
    parameters and scene embeddings of the same noise), `aasp-embed` (-> OUT_DIR/embed.npz) and
    `aasp-export` (-> OUT_DIR/export/).
"""

import argparse
import logging
import os
import sys

import jax
import numpy as np

# program_runner imports conftest, which asks for the test suite's 8 fake devices; this process
# keeps the devices its parent gave it.
_xla_flags = os.environ.get('XLA_FLAGS')
import program_runner  # noqa: E402
from conftest import FIXTURES, REPO_ROOT  # noqa: E402

if _xla_flags is None:
  os.environ.pop('XLA_FLAGS', None)
else:
  os.environ['XLA_FLAGS'] = _xla_flags

AUDIO = os.path.join(FIXTURES, 'audio')
FLAGS = (
  '--config.model.stem=conv',
  '--config.data.features=log_mel',
  '--config.global_batch=2',
  '--config.total_steps=4',
  '--config.checkpoint.every_steps=2',
  '--config.checkpoint.keep=5',
)


def config():
  from aasp_jax import configuration

  flags = [*program_runner.TINY_FLAGS, f'--config.data.train={AUDIO}', *FLAGS]
  path = os.path.join(REPO_ROOT, flags[0].removeprefix('--config='))
  return configuration.load_config(path, [f.removeprefix('--config.') for f in flags[1:]])


def noise() -> np.ndarray:
  """Two 1.5 s sounds (a window and a half of the tiny encoder)."""
  return (0.1 * np.random.default_rng(0).normal(size=(2, 24000))).astype(np.float32)


def train(workdir: str, reference: str | None) -> None:
  from jax.experimental import multihost_utils

  from aasp_jax import configuration
  from aasp_jax.evaluate import embed, hear, pretrained
  from aasp_jax.data import manifest
  from aasp_jax.models import build
  from aasp_jax.train import loop

  cfg = config()
  result = loop.train(cfg, workdir)
  teacher = result.state.teacher
  if jax.process_count() > 1:
    teacher = multihost_utils.process_allgather(teacher, tiled=True)
  teacher = jax.tree.map(np.asarray, jax.device_get(teacher))
  if reference is None or jax.process_index() != 0:
    return
  model = pretrained.Pretrained(
    config=cfg,
    encoder=build.build_encoder(cfg.model, drop_path=0.0),
    params=teacher,
    preset=configuration.frontend_preset(cfg),
    step=result.step,
    source='memory',
    which='teacher',
  )
  embedder = embed.Embedder(model)
  files = embedder.embed_files(manifest.read_entries(AUDIO))
  from aasp_jax.export import exporter

  np.savez(
    reference,
    scene=hear.get_scene_embeddings(noise(), embedder),
    files=files.embeddings,
    clip_ids=np.asarray(files.clip_ids, dtype=str),
    **{f'param/{k}': v for k, v in exporter.flatten_params(teacher).items()},
  )


def load(workdir: str, out_dir: str) -> None:
  from aasp_jax.evaluate import embed_cli, hear
  from aasp_jax.export import cli as export_cli, exporter

  assert jax.device_count() == 1, jax.devices()
  os.makedirs(out_dir, exist_ok=True)
  model = hear.load_model(workdir)
  np.savez(
    os.path.join(out_dir, 'hear.npz'),
    scene=hear.get_scene_embeddings(noise(), model),
    step=model.model.step,
    **{f'param/{k}': v for k, v in exporter.flatten_params(model.model.params).items()},
  )
  embedded = os.path.join(out_dir, 'embed.npz')
  assert embed_cli.main(['--checkpoint', workdir, '--input', AUDIO, '--output', embedded]) == 0
  assert export_cli.main([workdir, os.path.join(out_dir, 'export')]) == 0


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('mode', choices=['train', 'load'])
  parser.add_argument('workdir')
  parser.add_argument('out', nargs='?')
  parser.add_argument('--coordinator_address')
  parser.add_argument('--num_processes', type=int)
  parser.add_argument('--process_id', type=int)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(levelname)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)
  if args.coordinator_address:
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  if args.mode == 'train':
    train(args.workdir, args.out)
  else:
    load(args.workdir, args.out)


if __name__ == '__main__':
  main(sys.argv[1:])
