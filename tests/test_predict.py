"""The fine-tuned classifier a run saves (aasp_jax/finetune/checkpoint.py) and `aasp-predict`
(aasp_jax/finetune/predict.py), from the orbax checkpoint (JAX), the export in PyTorch and in ONNX.

One short fine-tune of the tiny AaPE encoder on the bundled Sonic Pi clips (real audio, laid out as
ESC-50 with the task's first fold column), with a learning rate high enough that the classes'
logits differ by far more than the backends' rounding. Independent references: the parameters the
run returned (the checkpoint must restore them bit for bit), the host (numpy) front end with the
encoder applied alone and a float64 numpy head, the run's own test accuracy, and the uninterrupted
run (a preempted and resumed one must end with the same losses and parameters).
"""

import csv
import json
import os
import shutil
import warnings

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT
from ml_collections import ConfigDict

from aasp_jax import checkpointing
from aasp_jax.audio import fbank_host
from aasp_jax.data import clips, manifest
from aasp_jax.evaluate import pretrained
from aasp_jax.finetune import checkpoint, cli, predict, trainer
from aasp_jax.models import build

SONICPI = os.path.join(REPO_ROOT, 'data', 'sonicpi')
STEPS, EVERY = 6, 3
TOLERANCE = 1e-4  # logits, between backends


def sonicpi_as_esc50(root: str) -> None:
  """The Sonic Pi task in ESC-50's layout: meta/esc50.csv and audio/ (a link to the repo's)."""
  with open(os.path.join(SONICPI, 'folds.csv')) as f:
    rows = list(csv.DictReader(f))
  classes = sorted({r['label'] for r in rows})
  os.makedirs(os.path.join(root, 'meta'))
  os.symlink(os.path.join(SONICPI, 'audio'), os.path.join(root, 'audio'))
  with open(os.path.join(root, 'meta', 'esc50.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['filename', 'fold', 'target', 'category', 'esc10', 'src_file', 'take'])
    for r in rows:
      name = os.path.basename(r['id'])
      fold = int(r['fold_repeat0']) + 1
      writer.writerow([name, fold, classes.index(r['label']), r['label'], 'False', name, 'A'])


@pytest.fixture(scope='module')
def run(tiny_checkpoints, tmp_path_factory):
  """(finetuner, result, workdir, dataset root) of a 6-step run on 2 (host) devices, with
  checkpoints at steps 3 and 6."""
  root = str(tmp_path_factory.mktemp('sonicpi_esc50'))
  sonicpi_as_esc50(root)
  workdir = str(tmp_path_factory.mktemp('ft') / 'sonicpi_run')
  config = cli.parse_config(
    [
      'aasp-finetune',
      f'--config={os.path.join(REPO_ROOT, "configs", "finetune", "esc50.py")}:test_fold=1',
      f'--config.dataset.root={root}',
      f'--config.init_checkpoint={tiny_checkpoints["aape"]}',
      f'--config.workdir={workdir}',
      f'--config.steps={STEPS}',
      f'--config.checkpoint.every_steps={EVERY}',
      '--config.batch_size=4',
      '--config.eval_batch_size=8',
      '--config.target_length=64',
      '--config.num_devices=2',  # data-parallel: the checkpoint is written from 2 devices
      '--config.log_every=1',
      '--config.mixup=0',
      '--config.specaug.time_masks=0',
      '--config.specaug.freq_masks=0',
      '--config.drop_path=0',
      '--config.optimizer.lr=0.02',
      '--config.optimizer.layer_decay=0.5',
      '--config.optimizer.warmup_fraction=0.0',
    ]
  )
  finetuner = trainer.Finetuner(config)
  result = finetuner.run()
  assert result.steps == STEPS and not result.preempted
  return finetuner, result, workdir, root


def assert_trees_equal(got, want):
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  flat_got = jax.tree_util.tree_leaves_with_path(got)
  assert len(flat_got) == len(flat_want)
  for path, value in flat_got:
    np.testing.assert_array_equal(value, flat_want[path], err_msg=jax.tree_util.keystr(path))


def test_checkpoint_restores_the_fine_tuned_classifier_bit_for_bit(run, tiny_checkpoints, caplog):
  finetuner, result, workdir, _ = run
  caplog.set_level('WARNING')
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    model = checkpoint.load_finetuned(workdir)  # written from 2 devices, restored onto one
  said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
  assert not [m for m in said if 'sharding' in m.lower()], said
  assert_trees_equal(model.encoder_params, result.params['encoder'])
  assert_trees_equal(model.head_params, result.params['head']['Dense_0'])
  assert model.labels == finetuner.splits.class_names and len(model.labels) == 10
  assert (model.step, model.multilabel, model.source) == (STEPS, False, 'sonicpi_run')
  assert model.preset == finetuner.preset and model.preset.target_length == 64
  assert model.model_config == finetuner.pretrained.config.model.to_dict()
  # Any of the three ways to name it; an older step; and what is not one.
  steps_dir = os.path.join(workdir, 'checkpoints')
  for path in (workdir, steps_dir, os.path.join(steps_dir, str(STEPS))):
    assert checkpoint.is_finetuned(path)
  assert checkpoint.load_finetuned(steps_dir, step=EVERY).step == EVERY
  assert not checkpoint.is_finetuned(tiny_checkpoints['aape'])
  assert not checkpoint.is_finetuned(os.path.join(workdir, 'missing'))
  with pytest.raises(ValueError, match='no fine-tuned classifier'):
    checkpoint.load_finetuned(tiny_checkpoints['aape'])
  # The other way round: commands that need a pre-training run say it in one line.
  with pytest.raises(ValueError, match='is a fine-tuning run'):
    pretrained.load_pretrained(workdir)
  assert checkpoint.saved_model_config(workdir) == model.model_config
  assert model.data == f'esc50 ({os.path.basename(run[3])})'  # the set, by its folder name


def first_windows(paths, preset):
  """(waveform [B, S] zero-padded, num_samples [B], unpadded first windows) of clips."""
  size = preset.window_length + (preset.target_length - 1) * preset.frame_shift
  windows = [clips.load_clip(p, preset.sample_rate, min_samples=1)[0][:size] for p in paths]
  waves = np.zeros((len(paths), size), np.float32)
  for i, w in enumerate(windows):
    waves[i, : len(w)] = w
  return waves, np.array([len(w) for w in windows], np.int32), windows


def test_jax_logits_equal_an_independent_recomputation(run):
  _, _, workdir, _ = run
  model = checkpoint.load_finetuned(workdir)
  folder = os.path.join(SONICPI, 'audio')
  names = ('ambi_choir.flac', 'bd_808.flac', 'bass_hit_c.flac', 'elec_blip.flac', 'loop_amen.flac')
  paths = [os.path.join(folder, n) for n in names]
  waves, lengths, windows = first_windows(paths, model.preset)
  assert lengths.min() < waves.shape[1]  # a short clip (zero-padded) is among them
  got = np.asarray(checkpoint.logits(model, checkpoint.features(model, waves, lengths)))
  # The host (numpy) front end, the encoder alone, and the head as a float64 matmul.
  x_btf = np.stack([fbank_host.features(w, model.preset) for w in windows])
  encoder = build.build_encoder(ConfigDict(model.model_config), drop_path=0.0)
  out = jax.jit(encoder.apply)({'params': model.encoder_params}, x_btf)
  cls_bd = np.asarray(out['cls'], np.float64)
  want = cls_bd @ model.head_params['kernel'].astype(np.float64) + model.head_params['bias']
  np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)


@pytest.fixture(scope='module')
def audio(run, tmp_path_factory):
  """(manifest of the test fold plus one corrupt file, its labels by clip id)."""
  finetuner, _, _, root = run
  folder = tmp_path_factory.mktemp('predict_audio')
  bad = folder / 'bad.wav'
  bad.write_bytes(b'RIFF' + bytes(range(256)) * 4)  # a WAV signature, then garbage
  path = folder / 'clips.csv'
  labels = {}
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['path', 'id'])
    for e in finetuner.splits.test.entries:
      clip_id = os.path.relpath(e.path, root)
      writer.writerow([e.path, clip_id])
      labels[clip_id] = e.labels[0]
    writer.writerow([str(bad), 'bad.wav'])
  return str(path), labels


def predict_json(capsys, tmp_path, *args):
  out = tmp_path / f'{len(os.listdir(tmp_path))}.json'
  code = predict.main([*args, '--json', str(out), '--top_k', '3'])
  printed = capsys.readouterr()
  assert code == 0, printed.err
  return json.loads(out.read_text()), printed


def test_predict_from_the_checkpoint_reports_skips_and_matches_the_run(
  run, audio, capsys, tmp_path
):
  _, result, workdir, _ = run
  manifest_path, labels = audio
  got, printed = predict_json(capsys, tmp_path, workdir, manifest_path)
  assert set(got) == set(labels)  # every readable clip, and only those
  assert 'skipped 1 of' in printed.err and 'unreadable: 1' in printed.err
  assert 'bad.wav' in printed.err
  lines = printed.out.splitlines()
  assert len(lines) == len(labels)
  clip_id, *fields = lines[0].split('  ')
  best = got[clip_id]['top_k']
  assert [f.split(' ')[0] for f in fields] == [b['label'] for b in best] and len(best) == 3
  assert len(got[clip_id]['logits']) == 10
  # The fine-tune's own final evaluation: the same windows, the same model.
  accuracy = np.mean([got[c]['top_k'][0]['label'] == labels[c] for c in labels])
  assert accuracy == pytest.approx(result.metric_value, abs=1e-9)
  # A step folder and --step name older checkpoints.
  older, _ = predict_json(capsys, tmp_path, workdir, manifest_path, '--step', str(EVERY))
  assert older.keys() == got.keys() and older != got


def test_bad_input_exits_2_with_one_line(run, audio, tiny_checkpoints, capsys, tmp_path):
  _, _, workdir, _ = run
  manifest_path, _ = audio
  (tmp_path / 'empty').mkdir()
  cases = {
    ('missing_run', manifest_path): 'SOURCE missing_run: no such folder',
    (tiny_checkpoints['aape'], manifest_path): 'pre-training checkpoint',
    (workdir, 'missing.csv'): 'AUDIO missing.csv',
    (workdir, str(tmp_path / 'empty')): 'no audio file found',
    (workdir, manifest_path, '--top_k', '0'): '--top_k=0',
    (workdir, manifest_path, '--backend', 'onnx'): 'needs an export folder',
    (workdir, manifest_path, '--backend', 'tensorflow'): 'argument --backend: invalid choice',
  }
  for argv, message in cases.items():
    try:
      code = predict.main(list(argv))
    except SystemExit as e:  # argparse's own errors
      code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)


def test_a_preempted_run_resumes_to_the_same_classifier(run, monkeypatch):
  """Run again from scratch, stopped as by a SIGTERM after step 4 (a checkpoint is saved, no final
  evaluation), then once more: it resumes at step 4 (the stream at its position) and ends with
  the uninterrupted run's losses and parameters, bit for bit."""
  finetuner, result, workdir, _ = run
  steps_dir = os.path.join(workdir, 'checkpoints')
  aside = workdir + '_checkpoints'
  shutil.move(steps_dir, aside)
  try:
    monkeypatch.setattr(trainer.PreemptionWatcher, 'reached', lambda self, step: step == 4)
    stopped = finetuner.run()
    assert stopped.preempted and stopped.steps == 4 and np.isnan(stopped.metric_value)
    assert checkpointing.complete_steps(steps_dir) == [EVERY, 4]
    monkeypatch.undo()
    again = finetuner.run()
  finally:
    shutil.rmtree(steps_dir, ignore_errors=True)
    shutil.move(aside, steps_dir)
  assert (again.start_step, again.steps, again.checkpoint_step) == (4, STEPS, STEPS)
  assert stopped.train_loss + again.train_loss == result.train_loss
  assert_trees_equal(again.params, result.params)
  assert again.metric_value == result.metric_value


# The export: PyTorch and ONNX (`aasp-export FINETUNE_WORKDIR OUT --onnx`).


@pytest.fixture(scope='module')
def export_dir(run, tmp_path_factory):
  pytest.importorskip('torch')
  pytest.importorskip('onnxruntime')
  from aasp_jax.export import cli as export_cli

  _, _, workdir, _ = run
  out = str(tmp_path_factory.mktemp('export') / 'sonicpi_classifier')
  assert export_cli.main([workdir, out, '--onnx']) == 0
  return out


@pytest.mark.slow
def test_checkpoint_torch_and_onnx_predictions_agree(run, audio, export_dir, capsys, tmp_path):
  _, _, workdir, _ = run
  manifest_path, _ = audio
  by_backend = {'jax': predict_json(capsys, tmp_path, workdir, manifest_path)[0]}
  for backend in ('torch', 'onnx'):
    by_backend[backend] = predict_json(
      capsys, tmp_path, export_dir, manifest_path, '--backend', backend
    )[0]
  reference = by_backend['jax']
  # Top-1 agreement means something: the best class leads the next by far more than the tolerance.
  margins = [np.diff(np.sort(r['logits'])[-2:])[0] for r in reference.values()]
  assert min(margins) > 10 * TOLERANCE
  for backend in ('torch', 'onnx'):
    got = by_backend[backend]
    assert got.keys() == reference.keys()
    diff = max(
      np.abs(np.subtract(got[c]['logits'], reference[c]['logits'])).max() for c in reference
    )
    print(f'max |logit difference| {backend} vs jax: {diff:.2e}')
    assert diff < TOLERANCE, backend
    assert all(got[c]['top_k'][0]['label'] == reference[c]['top_k'][0]['label'] for c in got)
  # The module the export folder ships, as a user loads it, gives the same from the waveform.
  import torch

  module = predict.import_export_module(export_dir)
  model = module.AaSPClassifier.from_pretrained(export_dir)
  jax_model = checkpoint.load_finetuned(workdir)
  entries = manifest.read_manifest(manifest_path)[:4]
  waves, lengths, _ = first_windows([e.path for e in entries], jax_model.preset)
  with torch.no_grad():
    features = model.encoder.features(torch.from_numpy(waves), torch.from_numpy(lengths)).numpy()
    logits = model(torch.from_numpy(features)).numpy()
  np.testing.assert_allclose(
    features, checkpoint.features(jax_model, waves, lengths), atol=TOLERANCE, rtol=0
  )
  for e, row in zip(entries, logits):
    clip_id = e.clip_id
    np.testing.assert_allclose(row, reference[clip_id]['logits'], atol=TOLERANCE, rtol=0)
