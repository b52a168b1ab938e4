"""Fine-tuning (aasp_jax.finetune: trainer, step, data, cli, checkpoint; evaluate.augment and
configs/finetune/).

Independent references: the layer-decay closed form written out here from parameter names; optax's
own AdamW; mixup and SpecAugment recomputed in numpy from what they drew; the metric recomputed
from the fine-tuned parameters with the host front end and scikit-learn / numpy; the checkpoint's
arrays restored by `pretrained`. Every recipe runs end to end on a fixture in its dataset's real
layout (`dataset_layouts.build_layout`).
"""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO_ROOT
from ml_collections import ConfigDict

from aasp_jax.audio import fbank_device
from aasp_jax.data import clips, manifest
from aasp_jax.evaluate import augment, pretrained
from aasp_jax.finetune import checkpoint as ft_checkpoint
from aasp_jax.finetune import cli as finetune_cli
from aasp_jax.finetune import data as ft_data
from aasp_jax.finetune import step as ft_step
from aasp_jax.finetune import trainer
from aasp_jax.train import optimizer as optimizer_lib

RECIPES = ('as20k', 'esc50', 'us8k', 'nsynth', 'spc2')
DATASET_OF = {'as20k': 'audioset', 'esc50': 'esc50', 'us8k': 'us8k', 'nsynth': 'nsynth'}
DATASET_OF['spc2'] = 'spc2'

# Small and fast: 64-frame windows (the tiny checkpoints' length), 2 clips per batch, 3 steps.
SMALL = [
  '--config.batch_size=2',
  '--config.eval_batch_size=2',
  '--config.steps=3',
  '--config.target_length=64',
  '--config.num_devices=1',
  '--config.log_every=1',
  '--config.specaug.time_width=8',
  '--config.specaug.freq_width=8',
]


def argv(recipe, root, checkpoint, workdir, *extra, arg=''):
  spec = os.path.join(REPO_ROOT, 'configs', 'finetune', f'{recipe}.py') + (f':{arg}' if arg else '')
  return [
    'aasp-finetune',
    f'--config={spec}',
    f'--config.dataset.root={root}',
    f'--config.init_checkpoint={checkpoint}',
    f'--config.workdir={workdir}',
    *SMALL,
    *extra,
  ]


def names(path):
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


# Layer-wise lr decay.


def expected_layer(name: str, depth: int) -> int:
  """The closed form of the brief: stem / CLS 0, block i i + 1, final norm and head depth + 1."""
  if re.match(r'encoder/(stem|cls)(/|$)', name):
    return 0
  block = re.match(r'encoder/blocks_(\d+)/', name)
  if block:
    return int(block.group(1)) + 1
  assert re.match(r'(encoder/norm|head)/', name), name
  return depth + 1


@pytest.fixture(scope='module')
def teacher(tiny_checkpoints):
  return pretrained.load_pretrained(tiny_checkpoints['aape'])


def classifier_params(teacher, num_classes=5):
  head = ft_step.ClsHead(num_classes).init(jax.random.key(1), jnp.zeros((1, teacher.width)))
  return {'encoder': teacher.params, 'head': jax.tree.map(np.asarray, head['params'])}


def test_layer_decay_factors_match_the_closed_form(teacher):
  depth = teacher.config.model.depth
  params = classifier_params(teacher)
  scales = ft_step.layer_scales(params, depth, 0.65)
  leaves = jax.tree_util.tree_leaves_with_path(scales)
  seen = set()
  for path, scale in leaves:
    layer = expected_layer(names(path), depth)
    seen.add(layer)
    assert scale == pytest.approx(0.65 ** (depth + 1 - layer), rel=1e-12), names(path)
  assert seen == set(range(depth + 2))  # every group is present: stem/CLS, each block, norm/head
  with pytest.raises(ValueError, match='No lr-decay layer'):
    ft_step.layer_id(('encoder', 'mystery'), depth)
  # Imported encoders (timm tables, EAT's post-LN) have these before the first block.
  assert ft_step.layer_id(('encoder', 'posemb'), depth) == 0
  assert ft_step.layer_id(('encoder', 'input_norm', 'scale'), depth) == 0


def test_optimizer_is_adamw_with_the_lr_scaled_per_layer():
  """Two steps of the layer-decayed optimizer equal optax.adamw's updates times the scale."""
  depth = 2
  rng = np.random.default_rng(0)

  def dense(n_in, n_out):
    return {'kernel': rng.standard_normal((n_in, n_out)), 'bias': rng.standard_normal(n_out)}

  params = {
    'encoder': {
      'stem': {'proj': dense(4, 3), 'gate': rng.standard_normal(3)},
      'cls': rng.standard_normal((1, 1, 3)),
      'blocks_0': {'mlp': dense(3, 3)},
      'blocks_1': {'mlp': dense(3, 3)},
      'norm': {'scale': rng.standard_normal(3)},
    },
    'head': {'Dense_0': dense(3, 2)},
  }
  params = jax.tree.map(lambda a: a.astype(np.float32), params)
  cfg = ConfigDict(
    dict(lr=1e-3, layer_decay=0.5, weight_decay=0.05, b1=0.9, b2=0.95, warmup_fraction=0.0)
  )
  cfg.clip_norm = 0.0
  tx, schedule = ft_step.make_optimizer(cfg, params, depth, total_steps=10)
  reference = optax.adamw(
    schedule, b1=0.9, b2=0.95, weight_decay=0.05, mask=optimizer_lib.weight_decay_mask
  )
  scales = ft_step.layer_scales(params, depth, 0.5)
  state, ref_state = tx.init(params), reference.init(params)
  for _ in range(2):
    grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
    updates, state = tx.update(grads, state, params)
    ref_updates, ref_state = reference.update(grads, ref_state, params)
    for (path, u), r, s in zip(
      jax.tree_util.tree_leaves_with_path(updates),
      jax.tree.leaves(ref_updates),
      jax.tree.leaves(scales),
    ):
      np.testing.assert_allclose(u, s * np.asarray(r), rtol=1e-5, atol=1e-12, err_msg=names(path))
    params = optax.apply_updates(params, updates)


# Augmentations.


def test_mixup_is_the_convex_combination_with_its_partner():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((5, 16, 8)).astype(np.float32)
  y = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1]]
  lam = np.array([0.3, 0.9, 0.5, 0.0, 1.0], np.float32)
  partner = np.array([4, 0, 1, 2, 3])
  mx, my = jax.jit(augment.mix)(x, y, lam, partner)
  for b in range(5):
    np.testing.assert_allclose(mx[b], lam[b] * x[b] + (1 - lam[b]) * x[partner[b]], rtol=1e-6)
    np.testing.assert_allclose(my[b], lam[b] * y[b] + (1 - lam[b]) * y[partner[b]], rtol=1e-6)
  # The random version: lam from Beta(alpha, alpha), partner b - 1, labels still sum to 1.
  out = jax.jit(augment.mixup, static_argnums=3)(jax.random.key(3), x, y, 0.8)
  lam, partner = np.asarray(out.lam), np.asarray(out.partner)
  np.testing.assert_array_equal(partner, [4, 0, 1, 2, 3])
  assert np.all((lam >= 0) & (lam <= 1)) and len(set(lam.tolist())) == 5
  expected = lam[:, None, None] * x + (1 - lam[:, None, None]) * x[partner]
  np.testing.assert_allclose(out.features, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.labels).sum(axis=1), 1.0, rtol=1e-6)


def test_spec_augment_masks_exactly_the_drawn_frames_and_bins():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((6, 100, 32)).astype(np.float32) + 5.0  # never equal to the mask value
  spec_augment = functools.partial(
    augment.spec_augment, time_masks=2, time_width=20, freq_masks=1, freq_width=10, mask_value=-1.5
  )
  out = jax.jit(spec_augment)(jax.random.key(7), x)
  t_start, t_width = np.asarray(out.time_start), np.asarray(out.time_width)
  f_start, f_width = np.asarray(out.freq_start), np.asarray(out.freq_width)
  assert t_width.shape == (6, 2) and f_width.shape == (6, 1)
  assert t_width.max() <= 20 and f_width.max() <= 10 and t_width.max() > 0
  assert np.all(t_start + t_width <= 100) and np.all(f_start + f_width <= 32)
  y = np.asarray(out.features)
  for b in range(6):
    frames = set()
    for s, w in zip(t_start[b], t_width[b]):
      frames |= set(range(s, s + w))
    bins = set(range(f_start[b, 0], f_start[b, 0] + f_width[b, 0]))
    masked = np.zeros((100, 32), bool)
    masked[sorted(frames), :] = True
    masked[:, sorted(bins)] = True
    # The expected number of frames / bins is masked, and exactly those.
    assert int(np.asarray(out.time_mask[b]).sum()) == len(frames)
    assert int(np.asarray(out.freq_mask[b]).sum()) == len(bins) == f_width[b, 0]
    np.testing.assert_array_equal(y[b][masked], -1.5)
    np.testing.assert_array_equal(y[b][~masked], x[b][~masked])


def test_token_dropping_keeps_a_sorted_random_subset():
  idx = np.asarray(augment.random_keep_indices(jax.random.key(0), 4, 40, 0.25))
  assert idx.shape == (4, 30)
  for row in idx:
    assert np.all(np.diff(row) > 0) and row.min() >= 0 and row.max() < 40
  assert len({tuple(r) for r in idx}) == 4
  with pytest.raises(ValueError, match='token_mask_ratio'):
    augment.num_kept_tokens(40, 1.0)


def test_balanced_sampler_weights_are_inverse_label_frequencies():
  entries = [
    manifest.Entry('a', ('speech',)),
    manifest.Entry('b', ('speech', 'dog')),
    manifest.Entry('c', ('speech',)),
    manifest.Entry('d', ('bell',)),
    manifest.Entry('e', ()),
  ]
  classes = ('speech', 'dog', 'bell')
  w_sum = ft_data.sampling_weights(entries, classes, 'sum')
  raw = np.array([1 / 3, 1 / 3 + 1, 1 / 3, 1, 0])
  np.testing.assert_allclose(w_sum, raw / raw.sum())
  w_rare = ft_data.sampling_weights(entries, classes, 'rarest')
  raw = np.array([1 / 3, 1, 1 / 3, 1, 0])
  np.testing.assert_allclose(w_rare, raw / raw.sum())
  np.testing.assert_allclose(ft_data.sampling_weights(entries, classes, 'none'), 0.2)


# The encoder at other lengths than pre-training.


def test_pretrained_encoder_runs_at_128_and_512_frames(teacher):
  """Fixed sin-cos positions and AaPE's band-pooled Lambda encoder are length-independent."""
  assert teacher.config.model.stem == 'aape' and teacher.preset.target_length == 64
  rng = np.random.default_rng(0)
  for frames in (128, 512):
    x = rng.standard_normal((2, frames, 128)).astype(np.float32)
    out = jax.jit(lambda p, x: teacher.encoder.apply({'params': p}, x))(teacher.params, x)
    assert out['tokens'].shape == (2, frames // 16 * 8, teacher.width)
    assert np.all(np.isfinite(out['cls']))


# End to end, on fixtures in each dataset's real layout.


@pytest.fixture(scope='module')
def layouts(tmp_path_factory):
  """{dataset name: root of a small fixture in its real layout}, built on first use."""
  import dataset_layouts

  class Layouts(dict):
    def __missing__(self, name):
      root = str(tmp_path_factory.mktemp(f'layout_{name}'))
      dataset_layouts.build_layout(name, root)
      self[name] = root
      return root

  return Layouts()


def make_finetuner(recipe, root, checkpoint, workdir, *extra, arg=''):
  config = finetune_cli.parse_config(argv(recipe, root, checkpoint, workdir, *extra, arg=arg))
  return trainer.Finetuner(config)


def direct_scores(finetuner, params, entries):
  """Scores of each clip computed one by one: decode, crop from the start, log-mel, forward."""
  preset = finetuner.preset
  crop = preset.window_length + (preset.target_length - 1) * preset.frame_shift
  apply = jax.jit(finetuner.model.apply)
  rows = []
  for e in entries:
    wave, _ = clips.load_clip(e.path, preset.sample_rate, e.start, e.end, min_samples=1)
    features = fbank_device.features(jnp.asarray(wave[:crop])[None], preset)
    logits = np.asarray(apply({'params': params}, features))[0].astype(np.float64)
    if finetuner.multilabel:
      rows.append(1 / (1 + np.exp(-logits)))
    else:
      rows.append(np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum())
  return np.array(rows)


def check_run(result, finetuner, steps=3):
  assert result.steps == steps and len(result.train_loss) == steps
  assert np.all(np.isfinite(result.train_loss))
  assert 0.0 <= result.metric_value <= 1.0
  assert result.evals[-1]['step'] == steps
  assert set(result.skipped) >= {'train', 'test'}
  assert result.num_train == len(finetuner.splits.train.entries) > 0


@pytest.mark.slow
def test_as20k_recipe_map_equals_scikit_learn_on_the_direct_scores(
  layouts, tiny_checkpoints, tmp_path
):
  from sklearn.metrics import average_precision_score

  finetuner = make_finetuner(
    'as20k', layouts['audioset'], tiny_checkpoints['aape'], tmp_path, arg='balanced_sampler=sum'
  )
  assert finetuner.multilabel and finetuner.config.token_mask_ratio > 0
  result = finetuner.run()
  check_run(result, finetuner)
  assert result.metric_name == 'mAP'
  test = finetuner.splits.test
  scores = direct_scores(finetuner, result.params, test.entries)
  targets = np.array([[c in e.labels for c in test.class_names] for e in test.entries], float)
  keep = targets.sum(axis=0) > 0
  want = np.mean(
    [average_precision_score(targets[:, c], scores[:, c]) for c in np.flatnonzero(keep)]
  )
  assert result.metric_value == pytest.approx(want, abs=1e-4)


@pytest.mark.slow
def test_nsynth_recipe_accuracy_equals_the_direct_scores(layouts, tiny_checkpoints, tmp_path):
  finetuner = make_finetuner('nsynth', layouts['nsynth'], tiny_checkpoints['aape'], tmp_path)
  result = finetuner.run()
  check_run(result, finetuner)
  test = finetuner.splits.test
  assert result.metric_name == 'accuracy'
  scores = direct_scores(finetuner, result.params, test.entries)
  labels = [test.class_names.index(e.labels[0]) for e in test.entries]
  assert result.metric_value == pytest.approx(np.mean(np.argmax(scores, 1) == labels), abs=1e-9)


@pytest.fixture(scope='module')
def eat_import(tmp_path_factory):
  """An encoder checkpoint imported from a (tiny, random) EAT fairseq checkpoint by the command
  line: conv stem, Audio-MAE sin-cos positions, post-LN blocks."""
  import test_import_eat as eat_test

  from aasp_jax.export import eat_layout

  torch = pytest.importorskip('torch')
  model = eat_test.randomised(eat_test.Data2VecMultiModel(), 0)
  state = {
    'cfg': {'model': {'num_heads': eat_test.HEADS, 'norm_eps': 1e-6}},
    'model': model.state_dict(),
  }
  folder = tmp_path_factory.mktemp('eat_import')
  torch.save(state, folder / 'EAT-tiny.pt')
  workdir = str(folder / 'run')
  argv = [
    '--weights',
    str(folder / 'EAT-tiny.pt'),
    '--workdir',
    workdir,
    '--config',
    eat_test.CONFIG,
  ]
  assert eat_layout.main(argv) == 0
  return workdir


@pytest.mark.slow
def test_us8k_recipe_from_an_imported_eat_encoder_holds_out_its_fold(layouts, eat_import, tmp_path):
  """An imported checkpoint fine-tunes with no manual step (its learned-free post-LN encoder,
  input norm included, gets layer-wise lr decay like any other)."""
  from aasp_jax.evaluate import datasets

  root = layouts['us8k']
  finetuner = make_finetuner('us8k', root, eat_import, tmp_path, arg='test_fold=2')
  m = finetuner.pretrained.config.model
  assert (m.stem, m.posemb, m.block_norm) == ('conv', 'sincos_mae', 'post')
  result = finetuner.run()
  check_run(result, finetuner)
  folds = np.array(datasets.read_dataset('us8k', root).folds)
  assert result.num_test == np.sum(folds == 2) and result.num_train == np.sum(folds != 2)


@pytest.mark.slow
def test_spc2_short_run_without_augmentation_lowers_the_training_loss(
  layouts, tiny_checkpoints, tmp_path
):
  finetuner = make_finetuner(
    'spc2',
    layouts['spc2'],
    tiny_checkpoints['aape'],
    tmp_path,
    '--config.steps=24',
    '--config.batch_size=4',
    '--config.eval_batch_size=4',
    '--config.eval_every=12',
    '--config.mixup=0',
    '--config.specaug.time_masks=0',
    '--config.specaug.freq_masks=0',
    '--config.drop_path=0',
    '--config.optimizer.lr=0.003',
    '--config.optimizer.layer_decay=1.0',
    '--config.optimizer.warmup_fraction=0.0',
  )
  assert finetuner.preset.target_length == 64
  result = finetuner.run()
  check_run(result, finetuner, steps=24)
  losses = np.array(result.train_loss)
  assert losses[-6:].mean() < 0.8 * losses[:6].mean(), losses
  assert [e['split'] for e in result.evals] == ['valid', 'test']


def test_encoder_starts_from_the_checkpoint_teacher(layouts, tiny_checkpoints, tmp_path):
  workdir = tiny_checkpoints['aape']
  finetuner = make_finetuner('esc50', layouts['esc50'], workdir, tmp_path)
  saved_teacher = pretrained.load_pretrained(workdir, which='teacher').params
  saved_student = pretrained.load_pretrained(workdir, which='student').params
  state = finetuner.initial_state()
  start = jax.device_get(state.params)
  for (path, got), want in zip(
    jax.tree_util.tree_leaves_with_path(start['encoder']), jax.tree.leaves(saved_teacher)
  ):
    np.testing.assert_array_equal(got, want, err_msg=names(path))
  differs = [
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(start['encoder']), jax.tree.leaves(saved_student))
  ]
  assert any(differs)  # the teacher, not the student
  assert np.abs(start['head']['Dense_0']['kernel']).max() < 1e-4  # MAE's near-zero head
  assert int(state.step) == 0


@pytest.mark.slow
def test_cli_writes_the_summary_and_counts_unreadable_clips(tiny_checkpoints, tmp_path, capsys):
  import dataset_layouts

  from aasp_jax.evaluate import datasets

  root = str(tmp_path / 'esc50')
  dataset_layouts.build_layout('esc50', root)
  labelled = datasets.read_dataset('esc50', root)
  test_fold = [e for e, f in zip(labelled.entries, labelled.folds) if f == 1]
  with open(test_fold[0].path, 'wb') as f:
    f.write(b'RIFF' + bytes(range(256)) * 4)  # a WAV signature, then garbage
  workdir = tmp_path / 'run'
  code = finetune_cli.main(
    argv('esc50', root, tiny_checkpoints['aape'], workdir, arg='test_fold=1')
  )
  out = capsys.readouterr()
  assert code == 0, out.err
  summary = json.load(open(workdir / finetune_cli.SUMMARY_FILE))
  assert summary['metric_name'] == 'accuracy' and summary['steps'] == 3
  assert f'accuracy = {summary["metric_value"]:.4f}' in out.out
  assert summary['num_test'] == len(test_fold)
  assert summary['skipped']['test']['unreadable'] == 1
  assert summary['evals'][-1]['clips'] == len(test_fold) - 1
  assert summary['config']['dataset']['test_fold'] == 1
  assert summary['checkpoint'].endswith(os.path.join('checkpoints', '2'))
  # The fine-tuned classifier is saved in the workdir (step 3, the final one), with its metrics.
  assert summary['checkpoint_step'] == 3 and ft_checkpoint.is_finetuned(workdir)
  model = ft_checkpoint.load_finetuned(workdir)
  assert model.labels == labelled.class_names and not model.multilabel
  assert (model.step, model.source, model.preset.target_length) == (3, 'run', 64)
  assert model.head_params['kernel'].shape == (model.model_config['width'], len(model.labels))
  logged = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [e['step'] for e in logged if 'loss' in e] == [1, 2, 3]
  assert logged[-1]['test/accuracy'] == summary['metric_value']


def test_config_mistakes_fail_before_anything_compiles(tiny_checkpoints, tmp_path, capsys):
  base = argv('esc50', str(tmp_path), tiny_checkpoints['aape'], tmp_path / 'w')
  cases = {
    '--config.optimizer.lrr=1': 'lrr',
    '--config.token_mask_ratio=1.5': 'token_mask_ratio',
    '--config.balanced_sampler=often': 'balanced_sampler',
    '--config.mixup=abc': 'mixup',
  }
  for flag, message in cases.items():
    assert finetune_cli.main(base + [flag]) == 2
    assert message in capsys.readouterr().err
  assert finetune_cli.main([a for a in base if 'init_checkpoint' not in a]) == 2
  assert 'init_checkpoint is required' in capsys.readouterr().err
  bad_arg = [a.replace('esc50.py', 'esc50.py:test_fold=9') for a in base]
  assert finetune_cli.main(bad_arg) == 2
  assert 'folds 1..5' in capsys.readouterr().err
  # Checked against the checkpoint's patch before any data is read.
  assert finetune_cli.main(base + ['--config.target_length=100']) == 2
  assert 'multiple of the encoder patch' in capsys.readouterr().err


def test_every_recipe_loads_locked_with_its_documented_length():
  lengths = {'as20k': 1024, 'esc50': 512, 'us8k': 400, 'nsynth': 400, 'spc2': 128}
  for recipe, frames in lengths.items():
    config = finetune_cli.parse_config(
      [
        'aasp-finetune',
        f'--config={os.path.join(REPO_ROOT, "configs", "finetune", recipe)}.py',
        '--config.dataset.root=/data',
        '--config.init_checkpoint=/ckpt',
        '--config.workdir=/run',
      ]
    )
    assert config.is_locked and config.target_length == frames
    assert config.dataset.name == DATASET_OF[recipe]
    assert config.optimizer.lr == 5e-5 and config.optimizer.layer_decay == 0.65
