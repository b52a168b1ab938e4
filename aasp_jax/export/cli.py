"""The `aasp-export` command: a training checkpoint -> a Hugging Face / PyTorch export folder.

  aasp-export runs/quickstart exports/quickstart                  # EMA teacher, newest step
  aasp-export runs/b16_conv exports/b16 --which student --step 40000 --timm --onnx
  aasp-export runs/ft_esc50 exports/esc50 --onnx                  # a fine-tuned classifier

Writes OUT_DIR/model.safetensors (PyTorch layout), config.json, preprocessor_config.json, the
model's code (aasp_torch.py and the transformers classes) and a README.md model card
(aasp_jax.export.exporter): the folder loads with transformers (trust_remote_code=True) or with
torch alone, without JAX or aasp-jax. A fine-tuning checkpoint gives an audio-classification
folder. With --timm also timm_model.safetensors (the timm / Audio-MAE layout, conv stem only), and
with --onnx also model.onnx (log-mel and its frame mask in, dynamic batch and time; scene / cls /
tokens out, or logits), checked against PyTorch with onnxruntime when installed; a graph that fails
its check is not written. No pickle file is written. Exit status:
0 done, 1 unreadable checkpoint or failed export, 2 bad arguments (including a non-empty OUT_DIR
without --force, and --timm with an AaPE stem).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

from aasp_jax.export import exporter

TIMM_WEIGHTS = exporter.TIMM_WEIGHTS
ONNX_MODEL = exporter.ONNX_MODEL
# Every file this command may write: --force replaces these (and only these) in OUT_DIR, so a
# stale model.onnx from an earlier run cannot sit next to new weights.
OUTPUTS = (*exporter.FILES, *exporter.OPTIONAL_FILES)


def _step(text: str) -> int:
  try:
    step = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not a step number') from None
  if step < 0:
    raise argparse.ArgumentTypeError(f'{text!r}: a step is >= 0')
  return step


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='aasp-export', description=__doc__.split('\n\n')[0])
  parser.add_argument(
    'checkpoint', help='training workdir, its checkpoints/ folder or a step folder'
  )
  parser.add_argument('out_dir', help='the export folder to write (must be empty unless --force)')
  parser.add_argument(
    '--which', choices=exporter.WHICH, default='teacher', help='which encoder (default: teacher)'
  )
  parser.add_argument('--step', type=_step, default=None, help='checkpoint step (default: newest)')
  parser.add_argument(
    '--timm', action='store_true', help='also write timm_model.safetensors (conv stem only)'
  )
  parser.add_argument(
    '--onnx', action='store_true', help='also write model.onnx (needs torch and onnx)'
  )
  parser.add_argument(
    '--force',
    action='store_true',
    help="write into a non-empty OUT_DIR (replacing this tool's files)",
  )
  return parser


def _saved_model_config(checkpoint: str, step: int | None) -> dict:
  """The `model` section saved with the checkpoint: one small JSON file, no arrays, read-only
  (without --step, of the newest checkpoint whose config reads). A fine-tuning checkpoint's is
  read with its classifier."""
  finetune = exporter.finetune_checkpoints()
  if finetune is not None and finetune.is_finetuned(checkpoint):
    return dict(finetune.saved_model_config(checkpoint, step))
  from aasp_jax.evaluate import pretrained

  return pretrained.saved_config(checkpoint, step)[0]['model']


def _check_out_dir(parser: argparse.ArgumentParser, out_dir: str, force: bool) -> None:
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    parser.error(f'OUT_DIR {out_dir} exists and is not a folder.')
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
    parser.error(
      f'OUT_DIR {out_dir} is not empty; choose an empty or new folder, or pass --force to replace '
      f'the export files in it ({", ".join(OUTPUTS)}).'
    )


def _missing_onnx_dependencies() -> list[str]:
  return [m for m in ('torch', 'onnx') if importlib.util.find_spec(m) is None]


def _size(num_bytes: int) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if num_bytes < 1024 or unit == 'GiB':
      return f'{num_bytes:.0f} {unit}' if unit == 'B' else f'{num_bytes:.1f} {unit}'
    num_bytes /= 1024
  raise AssertionError('unreachable')


def main(argv: list[str] | None = None) -> int:
  """Runs `aasp-export`; returns the exit status (0 ok, 1 bad files / failed export, 2 usage)."""
  parser = _parser()
  args = parser.parse_args(argv)
  out_dir = os.path.abspath(args.out_dir)
  _check_out_dir(parser, out_dir, args.force)
  if args.onnx and (missing := _missing_onnx_dependencies()):
    print(
      f'aasp-export: error: --onnx needs {" and ".join(missing)}: pip install torch onnx '
      '(and onnxruntime to check the file); nothing was written.',
      file=sys.stderr,
    )
    return 1
  start = time.perf_counter()
  timings = {}
  try:
    if args.timm:
      saved_model = _saved_model_config(args.checkpoint, args.step)
      timings['timm check'] = time.perf_counter() - start
      stem = saved_model.get('stem')
      if stem != 'conv':
        parser.error(
          f"--timm: the checkpoint's stem is {stem!r}; the timm / Audio-MAE layout holds only the "
          'plain conv stem (AaPE has no place in a timm ViT). Drop --timm: model.safetensors and '
          'the aasp-jax PyTorch module reproduce AaPE.'
        )
      from aasp_jax.export import timm_layout

      try:
        timm_layout.check_pre_norm(saved_model)
      except timm_layout.TimmLayoutError as e:
        parser.error(f'--timm: {e} Drop --timm.')
    if args.force:
      for name in OUTPUTS:
        if os.path.isfile(path := os.path.join(out_dir, name)):
          os.remove(path)
    result = exporter.export_checkpoint(args.checkpoint, out_dir, which=args.which, step=args.step)
    files = dict(result.files)
    timings['export'] = result.seconds
    if args.timm:
      files[TIMM_WEIGHTS], timings['timm'] = _write_timm(out_dir)
    if args.onnx:
      files[ONNX_MODEL], timings['onnx'], check = _write_onnx(out_dir)
    if args.timm or args.onnx:
      exporter.write_model_card(out_dir)  # lists the files just added
      files[exporter.MODEL_CARD] = os.path.getsize(os.path.join(out_dir, exporter.MODEL_CARD))
  except (OSError, ValueError) as e:
    print(f'aasp-export: error: {e}', file=sys.stderr)
    return 1
  total = time.perf_counter() - start
  what = 'fine-tuned classifier' if result.which == 'finetuned' else f'{result.which} encoder'
  print(f'aasp-export: {what} of step {result.step} -> {out_dir}')
  for name, num_bytes in files.items():
    print(f'  {name:<26} {_size(num_bytes):>10}')
  if args.onnx:
    print(f'  {check}')
  parts = ', '.join(f'{k} {v:.1f} s' for k, v in timings.items())
  print(f'aasp-export: wrote {len(files)} files in {total:.1f} s ({parts})')
  return 0


def _write_timm(out_dir: str) -> tuple[int, float]:
  """timm_model.safetensors from the export folder just written (not from the checkpoint)."""
  start = time.perf_counter()
  path = exporter.write_timm(out_dir)
  return os.path.getsize(path), time.perf_counter() - start


def _write_onnx(out_dir: str) -> tuple[int, float, str]:
  """model.onnx of the PyTorch model, and a line saying how it compares with PyTorch.

  The graph is written as model.onnx.unchecked and renamed only after it passed its check; a graph
  that fails is deleted, so no model.onnx that was refused sits next to the weights.
  """
  from aasp_jax.export import onnx_export

  start = time.perf_counter()
  path = os.path.join(out_dir, ONNX_MODEL)
  unchecked = path + '.unchecked'
  try:
    done = onnx_export.export_encoder_onnx(out_dir, unchecked)
    seconds = time.perf_counter() - start
    check = (
      f'{ONNX_MODEL}: opset {done.opset} ({done.exporter} exporter), dynamic batch and time (up to '
      f'{done.max_frames} frames); '
    )
    if importlib.util.find_spec('onnxruntime') is None:
      check += 'not checked: pip install onnxruntime to compare it with PyTorch'
    else:
      error = onnx_export.check_export(done)
      check += f'vs PyTorch (onnxruntime, CPU): max relative error {error:.2e}'
      if not error < onnx_export.CHECK_TOLERANCE:
        raise ValueError(
          f'{path}: refused and not written: {check}, above {onnx_export.CHECK_TOLERANCE:g}.'
        )
    os.replace(unchecked, path)
  finally:
    if os.path.exists(unchecked):
      os.remove(unchecked)
  return os.path.getsize(path), seconds, check


def run() -> None:
  """Console-script entry point."""
  sys.exit(main())


if __name__ == '__main__':
  run()
