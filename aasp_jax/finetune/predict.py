"""`aasp-predict`: class scores of audio clips from a fine-tuned classifier.

  aasp-predict runs/ft_esc50 clips/ --top_k 3                       # the run's checkpoint (JAX)
  aasp-predict exports/ft_esc50 clips.csv --backend torch --json out.json   # its export (PyTorch)
  aasp-predict exports/ft_esc50 clips.csv --backend onnx            # the export's model.onnx

SOURCE is a fine-tuning workdir, its checkpoints/ folder or one step's folder (backend jax, the
default for these), or the export folder of one (`aasp-export WORKDIR OUT [--onnx]`; backend torch,
the default for it, runs the PyTorch module shipped in the folder; backend onnx runs its model.onnx
with onnxruntime on the JAX front end's log-mel). AUDIO is a folder of audio (searched recursively)
or a manifest (.csv / .tsv / .jsonl with a "path" column).

Every clip is read by the evaluation input pipeline: its first window from the start, zero-padded
to the classifier's window, as fine-tuning evaluates. One line per clip goes to stdout,
  CLIP  label1 p1  label2 p2 ...
with CLIP the clip's id (its path relative to AUDIO, or the manifest's id) and the --top_k best
classes by softmax probability (single-label) or sigmoid score (multi-label). Clips that cannot be
used (missing, unreadable, silent, shorter than one frame, ...) are counted per reason and named on
stderr, never dropped silently. --json OUT also writes {CLIP: {"logits": [...], "top_k":
[{"label", "score"}, ...]}}.

Exit status: 0; 2 for bad input (one line on stderr naming the file or flag and what to do).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable

import numpy as np

from aasp_jax import configuration
from aasp_jax.audio import presets as presets_lib

PROG = 'aasp-predict'
BACKENDS = ('jax', 'torch', 'onnx')
EXPORT_CONFIG = 'config.json'
EXPORT_ONNX = 'model.onnx'
EXPORT_MODULE = 'aasp_torch'  # the PyTorch module an export folder ships
CLASSIFIER_ARCHITECTURE = 'AaSPForAudioClassification'
LISTED_SKIPS = 20  # skipped clips named on stderr (the rest are counted)
INSTALL_EXPORT = "pip install -e '.[export]'"


class BadInput(Exception):
  """A problem the user fixes: one line naming the file or flag and what to do (exit 2)."""


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A classifier of waveforms, whatever runs it.

  Attributes:
    labels: the class names, in the order of the logits.
    multilabel: sigmoid scores (True) or a softmax (False).
    preset: its front end (sample rate, window: how the clips are read).
    logits: (waveform [B, S] float32, num_samples [B] int32) -> logits [B, C] float32 numpy.
    description: where the model came from, for the report line.
  """

  labels: tuple[str, ...]
  multilabel: bool
  preset: presets_lib.FrontEndPreset
  logits: Callable[[np.ndarray, np.ndarray], np.ndarray]
  description: str


def scores(logits_bc: np.ndarray, multilabel: bool) -> np.ndarray:
  """Sigmoid (multi-label) or softmax (single-label) scores of logits, float64."""
  x = np.asarray(logits_bc, np.float64)
  if multilabel:
    return 1.0 / (1.0 + np.exp(-x))
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------ Backends


def is_export_folder(path: str) -> bool:
  return os.path.isfile(os.path.join(path, EXPORT_CONFIG))


def jax_predictor(source: str, step: int | None = None) -> Predictor:
  """The orbax checkpoint of a fine-tuning run, in JAX."""
  from aasp_jax.finetune import checkpoint

  if not checkpoint.is_finetuned(source):
    if is_export_folder(source):
      raise BadInput(
        f'SOURCE {source} is an export folder: use --backend torch or --backend onnx (or give the '
        'fine-tuning workdir it was exported from for --backend jax).'
      )
  try:
    model = checkpoint.load_finetuned(source, step)
  except (OSError, ValueError) as e:
    raise BadInput(f'SOURCE {source}: {e}') from None

  def logits(waveform_bs, num_samples_b):
    log_mel_btf = checkpoint.features(model, waveform_bs, num_samples_b)
    return np.asarray(checkpoint.logits(model, log_mel_btf))

  return Predictor(
    model.labels, model.multilabel, model.preset, logits, f'{model.source} step {model.step} (jax)'
  )


def _read_export_json(folder: str, name: str) -> dict:
  path = os.path.join(folder, name)
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except FileNotFoundError:
    raise BadInput(
      f'SOURCE {folder}: {name} is missing; export the fine-tuning run again (aasp-export WORKDIR '
      'OUT).'
    ) from None
  except (OSError, ValueError) as e:
    raise BadInput(f'{path}: unreadable ({e}); export the fine-tuning run again.') from None
  if not isinstance(value, dict):
    raise BadInput(f'{path}: not a JSON object; export the fine-tuning run again.')
  return value


def export_classifier_info(folder: str):
  """(labels, multilabel, FrontEndPreset) of a classifier export folder, or BadInput."""
  if not os.path.isdir(folder):
    raise BadInput(f'SOURCE {folder}: no such folder.')
  config = _read_export_json(folder, EXPORT_CONFIG)
  if CLASSIFIER_ARCHITECTURE not in (config.get('architectures') or ()):
    raise BadInput(
      f'SOURCE {folder}: {EXPORT_CONFIG} is not a classifier export (no {CLASSIFIER_ARCHITECTURE}'
      ' in "architectures"): export a fine-tuning workdir (aasp-export FINETUNE_WORKDIR OUT), not '
      'a pre-training one.'
    )
  id2label = config.get('id2label')
  try:
    labels = tuple(str(id2label[str(i)]) for i in range(len(id2label)))
  except (KeyError, TypeError):
    raise BadInput(f'{folder}/{EXPORT_CONFIG}: "id2label" must map "0".."C-1" to names.') from None
  multilabel = config.get('problem_type') == 'multi_label_classification'
  # The front end: config.json's 'frontend' (the exporter writes the preset there).
  frontend = config.get('frontend')
  if not isinstance(frontend, dict):
    raise BadInput(f'{folder}/{EXPORT_CONFIG}: no "frontend" section; export the run again.')
  fields = {f.name for f in dataclasses.fields(presets_lib.FrontEndPreset)}
  try:
    preset = presets_lib.FrontEndPreset.from_dict(
      {k: v for k, v in frontend.items() if k in fields}
    )
  except (TypeError, ValueError) as e:
    raise BadInput(f'{folder}/{EXPORT_CONFIG}: not a front-end preset ({e}).') from None
  return labels, multilabel, preset


def import_export_module(folder: str):
  """The PyTorch module shipped in an export folder (`aasp_torch`), imported from that folder (a
  module of that name imported earlier from another folder is replaced)."""
  for name in [n for n in sys.modules if n == EXPORT_MODULE or n.startswith(EXPORT_MODULE + '.')]:
    del sys.modules[name]
  folder = os.path.abspath(folder)
  sys.path.insert(0, folder)
  try:
    return importlib.import_module(EXPORT_MODULE)
  except ModuleNotFoundError as e:
    if e.name == EXPORT_MODULE:
      raise BadInput(
        f'SOURCE {folder}: no {EXPORT_MODULE} module in the export folder; export the fine-tuning '
        'run again with this aasp-jax (aasp-export WORKDIR OUT).'
      ) from None
    raise BadInput(f'--backend torch: {e.name} is not installed ({INSTALL_EXPORT}).') from None
  finally:
    sys.path.remove(folder)


def torch_predictor(folder: str) -> Predictor:
  """The export's PyTorch module (`AaSPClassifier.from_pretrained(folder)`), float32 on the CPU."""
  labels, multilabel, preset = export_classifier_info(folder)
  try:
    import torch
  except ImportError:
    raise BadInput(f'--backend torch needs PyTorch: {INSTALL_EXPORT}.') from None
  module = import_export_module(folder)
  model = module.AaSPClassifier.from_pretrained(folder)
  model.eval()

  def logits(waveform_bs, num_samples_b):
    with torch.no_grad():
      out = model.predict(torch.from_numpy(waveform_bs), torch.from_numpy(num_samples_b))
    return out.numpy().astype(np.float32)

  return Predictor(labels, multilabel, preset, logits, f'{folder} (torch)')


def onnx_predictor(folder: str) -> Predictor:
  """The export's model.onnx (log_mel -> logits) in onnxruntime, on the JAX front end's log-mel."""
  labels, multilabel, preset = export_classifier_info(folder)
  path = os.path.join(folder, EXPORT_ONNX)
  if not os.path.isfile(path):
    raise BadInput(
      f'SOURCE {folder}: no {EXPORT_ONNX}; export with --onnx (aasp-export WORKDIR OUT --onnx).'
    )
  try:
    import onnxruntime
  except ImportError:
    raise BadInput(f'--backend onnx needs onnxruntime: {INSTALL_EXPORT}.') from None
  from aasp_jax.finetune import checkpoint

  session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
  inputs = {i.name: i for i in session.get_inputs()}
  if 'log_mel' not in inputs or 'logits' not in {o.name for o in session.get_outputs()}:
    raise BadInput(f'{path}: not a classifier graph (log_mel -> logits); export it again.')
  fixed = inputs['log_mel'].shape[0] if isinstance(inputs['log_mel'].shape[0], int) else None

  def logits(waveform_bs, num_samples_b):
    x = np.asarray(checkpoint.log_mel(preset, waveform_bs, num_samples_b), np.float32)
    rows = fixed or len(x)
    out = [session.run(['logits'], {'log_mel': x[i : i + rows]})[0] for i in range(0, len(x), rows)]
    return np.concatenate(out).astype(np.float32)

  return Predictor(labels, multilabel, preset, logits, f'{path} (onnx)')


def load_predictor(source: str, backend: str | None, step: int | None = None) -> Predictor:
  """The classifier SOURCE names, run by `backend` (None: jax for a checkpoint, torch for an
  export folder)."""
  if not os.path.exists(source):
    raise BadInput(
      f'SOURCE {source}: no such folder; give a fine-tuning workdir (aasp-finetune '
      '--config.workdir) or its export folder (aasp-export WORKDIR OUT).'
    )
  if backend is None:
    backend = 'torch' if is_export_folder(source) else 'jax'
  if step is not None and backend != 'jax':
    raise BadInput('--step applies to a checkpoint (backend jax); an export holds one step.')
  if backend == 'jax':
    return jax_predictor(source, step)
  if not is_export_folder(source):
    raise BadInput(
      f'SOURCE {source}: --backend {backend} needs an export folder ({EXPORT_CONFIG} missing); '
      'export the run first (aasp-export WORKDIR OUT --onnx), or use --backend jax.'
    )
  return torch_predictor(source) if backend == 'torch' else onnx_predictor(source)


# ------------------------------------------------------------------------------------ Clips


@dataclasses.dataclass
class Predictions:
  """What `predict_entries` produced: clip ids and logits in entry order, and what was skipped."""

  clip_ids: list[str]
  logits: np.ndarray  # [N, C] float32
  skipped: dict[str, int]  # per reason
  skipped_ids: list[str]


def predict_entries(
  predictor: Predictor, entries, batch_size: int = 8, on_batch: Callable | None = None
) -> Predictions:
  """Logits of every usable entry's first window; `on_batch(ids, logits)` as batches finish.

  The clips are read as fine-tuning's evaluation reads them (`embeddings.pipeline_options`:
  entry order, the window from the start, clips shorter than one frame skipped). Batches are
  padded to `batch_size` rows, so a backend compiles one shape.
  """
  from aasp_jax.data import clips, pipeline, sources
  from aasp_jax.evaluate import embeddings

  options = embeddings.pipeline_options(predictor.preset, batch_size)
  dataset = pipeline.make_dataset(sources.EntrySource(entries), options, 0, 1)
  skipped = np.zeros(len(clips.SKIP_REASONS), np.int64)
  ids, chunks, done = [], [], set()
  for batch in dataset:
    skipped += batch['skipped']
    if 'index' not in batch:  # the host-only tail: skip counts only
      continue
    rows = len(batch['index'])
    waveform = embeddings.pad_rows(batch['waveform'], batch_size).astype(np.float32)
    num_samples = embeddings.pad_rows(batch['num_samples'], batch_size).astype(np.int32)
    logits = np.asarray(predictor.logits(waveform, num_samples), np.float32)[:rows]
    batch_ids = [entries[int(i)].clip_id or entries[int(i)].path for i in batch['index']]
    done.update(int(i) for i in batch['index'])
    ids.extend(batch_ids)
    chunks.append(logits)
    if on_batch is not None:
      on_batch(batch_ids, logits)
  counts = pipeline.skip_summary(skipped)
  missed = [e.clip_id or e.path for i, e in enumerate(entries) if i not in done]
  if len(missed) != sum(counts.values()):
    raise RuntimeError(
      f'{len(entries)} clips in, {len(ids)} predicted and {sum(counts.values())} skipped: the '
      'input pipeline lost clips without counting them.'
    )
  width = len(predictor.labels)
  logits = np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)
  return Predictions(ids, logits, counts, missed)


def top_k(logits_c: np.ndarray, labels, multilabel: bool, k: int) -> list[tuple[str, float]]:
  """The k best (label, score) of one clip, best first."""
  s = scores(logits_c[None], multilabel)[0]
  order = np.argsort(-s, kind='stable')[:k]
  return [(labels[i], float(s[i])) for i in order]


# ------------------------------------------------------------------------------------ Command


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line and exit 2, not the usage block
    print(f'{PROG}: error: {message} (see {PROG} --help)', file=sys.stderr)
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog=PROG, description=__doc__.split('\n\n')[0])
  parser.add_argument('source', metavar='SOURCE', help='fine-tuning workdir/checkpoint or export')
  parser.add_argument('audio', metavar='AUDIO', help='folder of audio, or a .csv/.tsv/.jsonl file')
  parser.add_argument('--top_k', type=int, default=5, help='classes printed per clip (default 5)')
  parser.add_argument(
    '--backend',
    choices=BACKENDS,
    default=None,
    help='default: jax for a checkpoint, torch for an export folder',
  )
  parser.add_argument('--json', metavar='OUT', default=None, help='also write the results here')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: newest)')
  parser.add_argument('--batch_size', type=int, default=8, help='clips per forward pass')
  return parser


def _read_audio(audio: str) -> tuple[list, dict[str, int]]:
  from aasp_jax.data import manifest

  ignored: dict[str, int] = {}
  if not os.path.exists(audio):
    raise BadInput(f'AUDIO {audio}: no such folder or manifest file.')
  try:
    entries = manifest.read_entries(audio, ignored)
  except (OSError, ValueError) as e:
    raise BadInput(f'AUDIO {audio}: {e}') from None
  if not entries:
    found = ', '.join(f'{n} {ext or "(no extension)"}' for ext, n in sorted(ignored.items()))
    raise BadInput(
      f'AUDIO {audio}: no audio file found' + (f' (only {found})' if found else '') + '; give a '
      'folder of audio files or a manifest with a "path" column.'
    )
  return entries, ignored


def main(argv: list[str] | None = None) -> int:
  """Runs `aasp-predict`; returns the exit status (0, or 2 for bad input)."""
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
  try:
    for flag in ('top_k', 'batch_size'):
      if getattr(args, flag) < 1:
        raise BadInput(f'--{flag}={getattr(args, flag)}: give a positive number.')
    if args.json and os.path.isdir(args.json):
      raise BadInput(f'--json {args.json}: is a folder; give a file name, e.g. predictions.json.')
    entries, ignored = _read_audio(args.audio)
    predictor = load_predictor(args.source, args.backend, args.step)
    k = min(args.top_k, len(predictor.labels))
    results = {}

    def emit(ids, logits_bc):
      for clip_id, row in zip(ids, logits_bc):
        best = top_k(row, predictor.labels, predictor.multilabel, k)
        print(f'{clip_id}  ' + '  '.join(f'{label} {p:.4f}' for label, p in best), flush=True)
        results[clip_id] = {
          'logits': [float(v) for v in row],
          'top_k': [{'label': label, 'score': p} for label, p in best],
        }

    try:
      out = predict_entries(predictor, entries, args.batch_size, on_batch=emit)
    except configuration.ConfigError as e:  # data.DataError: no usable clip at all
      raise BadInput(f'AUDIO {args.audio}: {e}') from None
  except BadInput as e:
    print(f'{PROG}: error: {e}', file=sys.stderr)
    return 2
  skipped = sum(out.skipped.values())
  if skipped:
    reasons = ', '.join(f'{r}: {n}' for r, n in out.skipped.items() if n)
    more = f' and {skipped - LISTED_SKIPS} more' if skipped > LISTED_SKIPS else ''
    print(
      f'{PROG}: skipped {skipped} of {len(entries)} clip(s) ({reasons}): '
      + ', '.join(out.skipped_ids[:LISTED_SKIPS])
      + more,
      file=sys.stderr,
    )
  if ignored:
    print(f'{PROG}: ignored non-audio files: {ignored}', file=sys.stderr)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)
  print(
    f'{PROG}: {len(out.clip_ids)} of {len(entries)} clip(s) classified with '
    f'{predictor.description}' + (f'; wrote {args.json}' if args.json else ''),
    file=sys.stderr,
  )
  if not out.clip_ids:
    print(
      f'{PROG}: error: no clip of AUDIO {args.audio} could be used; see the skips above.',
      file=sys.stderr,
    )
    return 2
  return 0


def run() -> None:
  """Console-script entry point."""
  sys.exit(main())


if __name__ == '__main__':
  run()
