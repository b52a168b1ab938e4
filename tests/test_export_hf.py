"""The export folder as a Hugging Face / PyTorch user meets it (aasp_jax/export/exporter.py, hf/).

One real tiny checkpoint (the AaPE run: 2 steps, width 32, depth 2, 64-frame windows) with every
parameter moved off its initial value (`eval_checkpoints.every_branch_active`: AaPE's gate and
Lambda encoder are live) is exported as an encoder folder and, with a random linear head, as a
classifier folder, each with model.onnx.
A Python process that holds only torch, numpy, safetensors, transformers, onnxruntime and their
dependencies (no JAX, Flax or aasp_jax: they are checked to be unimportable) then loads the
folders three ways (AutoModel / AutoModelForAudioClassification + AutoFeatureExtractor with
trust_remote_code, `sys.path` + `import aasp_torch`, onnxruntime) on real audio, and round-trips
the model through `save_pretrained`; its outputs are compared with JAX here. Relative error:
max|got - jax| / max|jax| over the whole array.
"""

import ast
import dataclasses
import json
import os
import subprocess
import sys
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
import eval_checkpoints
from conftest import REPO_ROOT

pytest.importorskip('torch')
pytest.importorskip('transformers')
pytest.importorskip('onnxruntime')

from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402

from aasp_jax.audio import fbank_device  # noqa: E402
from aasp_jax.data import clips  # noqa: E402
from aasp_jax.evaluate import embed, pretrained, protocol  # noqa: E402
from aasp_jax.export import exporter, onnx_export  # noqa: E402

TOLERANCE = 1e-5
SONICPI = os.path.join(REPO_ROOT, 'data', 'sonicpi', 'audio')
# 1.75 s (3 windows of 64 frames), 0.86 s (2 windows, the second mostly padding) and 0.09 s (part of
# one patch).
CLIPS = ('loop_amen.flac', 'hat_len.flac', 'elec_pop.flac')
LABELS = ('dog', 'rain', 'sea waves', 'crackling fire', 'crickets')
# What the torch-only process may hold: these distributions and everything they require.
TORCH_ONLY = ('torch', 'numpy', 'safetensors', 'transformers', 'onnxruntime')


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.fixture(scope='module')
def exported(tiny_checkpoints, tmp_path_factory):
  """(the JAX Pretrained, encoder folder, classifier folder, head {'kernel', 'bias'})."""
  root = tmp_path_factory.mktemp('hf_export')
  checkpoint = tiny_checkpoints['aape']
  model = pretrained.load_pretrained(checkpoint)
  model = dataclasses.replace(model, params=eval_checkpoints.every_branch_active(model.params))
  encoder_dir = str(root / 'encoder')
  exporter.write_export(
    encoder_dir,
    model.config.model,
    model.preset,
    model.params,
    which=model.which,
    step=model.step,
    source=model.source,
    data=model.config.data.train,
    origin=model.origin,
  )
  rng = np.random.default_rng(0)
  head = {
    'kernel': rng.standard_normal((32, len(LABELS))).astype(np.float32),
    'bias': rng.standard_normal(len(LABELS)).astype(np.float32),
  }
  classifier_dir = str(root / 'classifier')
  exporter.write_export(
    classifier_dir,
    model.config.model,
    model.preset,
    model.params,
    which='finetuned',
    step=7,
    source=os.path.join(checkpoint, 'checkpoints', '2'),
    head=head,
    labels=LABELS,
    multilabel=True,
    data=model.config.data.train,
  )
  for folder in (encoder_dir, classifier_dir):
    onnx_export.export_encoder_onnx(folder, os.path.join(folder, 'model.onnx'))
    exporter.write_model_card(folder)
  return model, encoder_dir, classifier_dir, head


@pytest.fixture(scope='module')
def audio():
  """(waveforms [3, S] zero-padded, true lengths [3]) of real clips of mixed lengths."""
  waves = [clips.load_clip(os.path.join(SONICPI, n), 16000, min_samples=400)[0] for n in CLIPS]
  batch = np.zeros((len(waves), max(map(len, waves))), np.float32)
  for i, wave in enumerate(waves):
    batch[i, : len(wave)] = wave
  return batch, np.array([len(w) for w in waves])


# ----------------------------------------------------------------------------------------------
# A process without JAX
# ----------------------------------------------------------------------------------------------


def dependency_closure(names) -> dict[str, metadata.Distribution]:
  """{distribution name: distribution} of `names` and everything they require (extras left out;
  optional requirements that are not installed are skipped)."""
  found, todo = {}, list(names)
  while todo:
    name = canonicalize_name(todo.pop())
    if name in found:
      continue
    try:
      dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
      continue
    found[name] = dist
    for text in dist.requires or ():
      requirement = Requirement(text)
      if requirement.marker is None or requirement.marker.evaluate({'extra': ''}):
        todo.append(requirement.name)
  return found


def isolated_site(root) -> str:
  """A folder of links to the installed files of `TORCH_ONLY`'s dependency closure: the only
  third-party code an `-I -S` interpreter with it on sys.path can import."""
  site = os.path.join(str(root), 'site')
  os.makedirs(site)
  for dist in dependency_closure(TORCH_ONLY).values():
    base = str(dist.locate_file(''))
    for top in {f.parts[0] for f in dist.files or () if f.parts}:
      # The .dist-info folders come along: packages read their own version from them.
      if top in ('..', '__pycache__') or top.endswith(('.data', '.pth')):
        continue
      if not os.path.exists(link := os.path.join(site, top)):
        os.symlink(os.path.join(base, top), link)
  return site


TORCH_ONLY_SCRIPT = r"""
import importlib.util, json, os, sys
site, encoder_dir, classifier_dir, audio_path, out_path, scratch = sys.argv[1:]
sys.path.append(site)
blocked = [m for m in ('jax', 'jaxlib', 'flax', 'aasp_jax', 'ml_collections', 'orbax')
           if importlib.util.find_spec(m) is not None]
assert not blocked, f'importable: {blocked}'
import numpy as np
import torch
import onnxruntime
from transformers import (AutoFeatureExtractor, AutoModel, AutoModelForAudioClassification)

audio = np.load(audio_path)
waves, lengths = audio['waves'], audio['lengths']
clips = [w[:n] for w, n in zip(waves, lengths)]
out = {}
with torch.no_grad():
  # 1. transformers, the folder's own code.
  extractor = AutoFeatureExtractor.from_pretrained(encoder_dir, trust_remote_code=True)
  inputs = extractor(clips, sampling_rate=16000, return_tensors='pt')
  model = AutoModel.from_pretrained(encoder_dir, trust_remote_code=True)
  hf = model(**inputs)  # input_values and attention_mask: the padding is masked
  out.update(input_values=inputs['input_values'].numpy(), hf_cls=hf.cls.numpy(),
             hf_scene=hf.scene.numpy(), attention_mask=inputs['attention_mask'].numpy())
  # Clips longer than a window: the documented method, HEAR's windowing.
  out['hf_embed_scene'] = model.embed(torch.from_numpy(waves), torch.from_numpy(lengths))['scene']
  classifier = AutoModelForAudioClassification.from_pretrained(
    classifier_dir, trust_remote_code=True)
  out['hf_logits'] = classifier(**inputs).logits.numpy()
  # save_pretrained -> from_pretrained: the same model again.
  model.save_pretrained(os.path.join(scratch, 'resaved'))
  again = AutoModel.from_pretrained(os.path.join(scratch, 'resaved'), trust_remote_code=True)
  out['resaved_scene'] = again(**inputs).scene.numpy()
  # 2. PyTorch alone: the folder on sys.path.
  sys.path.insert(0, encoder_dir)
  import aasp_torch
  encoder = aasp_torch.AaSPEncoder.from_pretrained(encoder_dir)
  out['torch_scene'] = encoder.embed(torch.from_numpy(waves), torch.from_numpy(lengths))['scene']
  predictor = aasp_torch.AaSPClassifier.from_pretrained(classifier_dir)
  out['torch_logits'] = predictor.predict(torch.from_numpy(waves), torch.from_numpy(lengths))
  out['torch_labels'] = np.array(predictor.labels)
  # The resaved folder is an aasp_torch folder too.
  resaved = aasp_torch.AaSPEncoder.from_pretrained(os.path.join(scratch, 'resaved'))
  out['resaved_torch_scene'] = resaved.embed(
    torch.from_numpy(waves), torch.from_numpy(lengths))['scene']
# 3. onnxruntime, fed by the feature extractor.
feats = extractor(clips, sampling_rate=16000, return_tensors='np')
session = onnxruntime.InferenceSession(os.path.join(encoder_dir, 'model.onnx'),
                                       providers=['CPUExecutionProvider'])
out['onnx_scene'], out['onnx_cls'] = session.run(
  ['scene', 'cls'], {'log_mel': feats['input_values'], 'attention_mask': feats['attention_mask']})
session = onnxruntime.InferenceSession(os.path.join(classifier_dir, 'model.onnx'),
                                       providers=['CPUExecutionProvider'])
out['onnx_logits'] = session.run(['logits'], {'log_mel': feats['input_values']})[0]
np.savez(out_path, **{k: np.asarray(v) for k, v in out.items()})
print(sorted(m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('jax', 'flax')))
"""


@pytest.fixture(scope='module')
def torch_only_outputs(exported, audio, tmp_path_factory):
  """The torch-only process's outputs (see TORCH_ONLY_SCRIPT)."""
  _, encoder_dir, classifier_dir, _ = exported
  root = tmp_path_factory.mktemp('torch_only')
  site = isolated_site(root)
  np.savez(root / 'audio.npz', waves=audio[0], lengths=audio[1])
  env = {
    'PATH': os.environ.get('PATH', '/usr/bin:/bin'),
    'HOME': str(root),
    'HF_HOME': str(root / 'hf_home'),
    'HF_HUB_OFFLINE': '1',
    'HF_HUB_DISABLE_PROGRESS_BARS': '1',
    'TRANSFORMERS_VERBOSITY': 'error',
    'OMP_NUM_THREADS': '2',
  }
  argv = [site, encoder_dir, classifier_dir, str(root / 'audio.npz'), str(root / 'out.npz')]
  done = subprocess.run(
    [sys.executable, '-I', '-S', '-B', '-c', TORCH_ONLY_SCRIPT, *argv, str(root)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert done.returncode == 0, done.stderr[-5000:]
  assert done.stdout.strip().splitlines()[-1] == '[]'  # nothing of JAX was even loaded
  return dict(np.load(root / 'out.npz'))


def jax_window_outputs(model, audio, masked: bool):
  """JAX's log-mel, CLS and token mean of each clip's first window (zero-padded), with the time
  patches holding no frame of the clip masked (the padding rule of HEAR and the probes, which the
  feature extractor's attention_mask carries) or not (the classifier's, as fine-tuning reads
  clips), and the frame mask."""
  waves, lengths = audio
  preset = model.preset
  samples = preset.window_length + (preset.target_length - 1) * preset.frame_shift
  windows = np.zeros((len(waves), samples), np.float32)
  windows[:, : min(samples, waves.shape[1])] = waves[:, :samples]
  valid = np.minimum(lengths, samples)
  x = fbank_device.features(jnp.asarray(windows), preset, jnp.asarray(valid))
  frames = np.asarray(protocol.valid_frames(valid, preset))
  frame_valid = np.arange(preset.target_length)[None] < frames[:, None]
  patch_t, patch_f = protocol._patch_size(model.encoder)
  token_valid = np.repeat(frame_valid[:, ::patch_t], preset.num_mel_bins // patch_f, axis=1)
  apply = jax.jit(model.encoder.apply)
  if masked:
    out = apply({'params': model.params}, x, token_valid_bn=jnp.asarray(token_valid))
    w = token_valid[..., None].astype(np.float64)
    mean = (np.asarray(out['tokens'], np.float64) * w).sum(1) / w.sum(1)
  else:
    out = apply({'params': model.params}, x)
    mean = np.asarray(out['tokens']).mean(axis=1)
  return np.asarray(x), np.asarray(out['cls']), mean, frame_valid


def test_a_torch_only_process_loads_the_folder_three_ways_and_matches_jax(
  exported, audio, torch_only_outputs
):
  model, _, _, head = exported
  got = torch_only_outputs
  x, cls, mean, frame_valid = jax_window_outputs(model, audio, masked=True)
  assert frame_valid.all(axis=1).sum() == 2 and not frame_valid[2].all()  # one clip is short
  _, cls_unmasked, _, _ = jax_window_outputs(model, audio, masked=False)
  logits = cls_unmasked.astype(np.float64) @ head['kernel'] + head['bias']
  scene = np.concatenate([cls, mean], axis=1)
  hear_scene = embed.Embedder(model).scene_embeddings(*audio)
  errors = {
    'input_values': rel_err(got['input_values'], x),
    'transformers cls': rel_err(got['hf_cls'], cls),
    'transformers scene': rel_err(got['hf_scene'], scene),
    'transformers embed scene (HEAR)': rel_err(got['hf_embed_scene'], hear_scene),
    'transformers logits': rel_err(got['hf_logits'], logits),
    'aasp_torch scene (embed)': rel_err(got['torch_scene'], hear_scene),
    'aasp_torch logits': rel_err(got['torch_logits'], logits),
    'onnxruntime scene': rel_err(got['onnx_scene'], scene),
    'onnxruntime cls': rel_err(got['onnx_cls'], cls),
    'onnxruntime logits': rel_err(got['onnx_logits'], logits),
  }
  print(f'relative errors against JAX: {errors}')
  assert max(errors.values()) < TOLERANCE, errors
  np.testing.assert_array_equal(got['attention_mask'], frame_valid.astype(np.int32))
  # The short clip's scene is HEAR's (one window), whatever else is in the batch.
  assert rel_err(got['hf_scene'][2], hear_scene[2]) < TOLERANCE
  assert tuple(got['torch_labels']) == LABELS
  # save_pretrained round trip: identical outputs, and aasp_torch reads the resaved folder.
  np.testing.assert_array_equal(got['resaved_scene'], got['hf_scene'])
  np.testing.assert_array_equal(got['resaved_torch_scene'], got['torch_scene'])


def test_the_isolated_site_holds_no_jax():
  closure = dependency_closure(TORCH_ONLY)
  assert {'torch', 'numpy', 'safetensors', 'transformers'} <= set(closure)
  assert not {'jax', 'jaxlib', 'flax', 'aasp-jax', 'ml-collections'} & set(closure)


# ----------------------------------------------------------------------------------------------
# The folder's files
# ----------------------------------------------------------------------------------------------


def test_the_code_files_are_the_package_files_and_import_no_aasp_jax(exported):
  _, encoder_dir, _, _ = exported
  for name in exporter.CODE_FILES:
    with open(os.path.join(encoder_dir, name), 'rb') as f:
      text = f.read()
    with open(os.path.join(exporter.CODE_DIR, name), 'rb') as f:
      assert text == f.read(), f'{name} differs from aasp_jax/export/hf/{name}'
    imported = set()
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, ast.Import):
        imported |= {alias.name.split('.')[0] for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        imported.add(node.module.split('.')[0])
    assert not {'aasp_jax', 'jax', 'flax', 'ml_collections'} & imported, (name, imported)
    if name == 'aasp_torch.py':
      assert imported - set(sys.stdlib_module_names) == {'numpy', 'safetensors', 'torch'}


def test_no_absolute_path_of_this_machine_is_written(exported, tiny_checkpoints):
  _, encoder_dir, classifier_dir, _ = exported
  machine_paths = {
    os.path.dirname(tiny_checkpoints['conv']),
    os.path.dirname(encoder_dir),
    REPO_ROOT,
    os.path.expanduser('~'),
  }
  for folder in (encoder_dir, classifier_dir):
    for name in os.listdir(folder):
      with open(os.path.join(folder, name), 'rb') as f:
        blob = f.read()
      for path in machine_paths:
        assert path.encode() not in blob, (name, path)


def test_config_and_preprocessor_are_what_transformers_reads(exported):
  model, encoder_dir, classifier_dir, _ = exported
  with open(os.path.join(encoder_dir, 'config.json')) as f:
    config = json.load(f)
  assert (config['model_type'], config['architectures']) == ('aasp', ['AaSPModel'])
  assert config['auto_map'] == {
    'AutoConfig': 'configuration_aasp.AaSPConfig',
    'AutoModel': 'modeling_aasp.AaSPModel',
  }
  assert (config['which'], config['step'], config['source'], config['data']) == (
    'teacher',
    2,
    'tiny_aape',
    'fixtures/audio',
  )
  assert config['aasp_jax_version'] and 'id2label' not in config
  with open(os.path.join(classifier_dir, 'config.json')) as f:
    config = json.load(f)
  assert config['architectures'] == ['AaSPForAudioClassification']
  assert config['auto_map']['AutoModelForAudioClassification'] == (
    'modeling_aasp.AaSPForAudioClassification'
  )
  assert config['id2label'] == {str(i): label for i, label in enumerate(LABELS)}
  assert config['label2id'] == {label: i for i, label in enumerate(LABELS)}
  assert config['problem_type'] == 'multi_label_classification'
  assert config['tensors']['classifier.weight'] == [len(LABELS), 32]
  with open(os.path.join(encoder_dir, 'preprocessor_config.json')) as f:
    preprocessor = json.load(f)
  assert preprocessor['auto_map'] == {
    'AutoFeatureExtractor': 'feature_extraction_aasp.AaSPFeatureExtractor'
  }
  assert preprocessor['feature_extractor_type'] == 'AaSPFeatureExtractor'
  assert (preprocessor['sampling_rate'], preprocessor['feature_size']) == (16000, 128)
  preset = dataclasses.asdict(model.preset)
  preset.pop('sample_rate')
  assert {k: preprocessor[k] for k in preset} == preset


def test_the_model_card_has_a_yaml_header_the_files_and_three_ways_to_load(exported):
  _, encoder_dir, classifier_dir, _ = exported
  for folder, pipeline in ((encoder_dir, 'feature-extraction'), (classifier_dir, 'audio-')):
    with open(os.path.join(folder, 'README.md')) as f:
      card = f.read()
    assert card.startswith('---\n')
    meta = yaml.safe_load(card.split('---\n')[1])
    assert meta['license'] == 'apache-2.0' and meta['library_name'] == 'transformers'
    assert {'audio', 'audio-spectrogram-transformer', 'aasp'} <= set(meta['tags'])
    assert meta['data'] == 'fixtures/audio' and meta['pipeline_tag'].startswith(pipeline)
    for name in (*exporter.FILES, 'model.onnx'):
      assert f'- `{name}`' in card, name
    assert 'timm_model.safetensors' not in card  # not written here
    for way in ('trust_remote_code=True', 'import aasp_torch', 'onnxruntime.InferenceSession'):
      assert way in card
  assert 'AaSPClassifier.from_pretrained' in card and '`crackling fire`' in card


def test_a_classifier_head_goes_back_to_jax(exported):
  model, _, classifier_dir, head = exported
  config, _, tensors = exporter.load_export(classifier_dir)
  assert config['problem_type'] == 'multi_label_classification'
  assert sorted(tensors) == sorted(exporter.flatten_params(model.params))
  back = exporter.head_from_export(classifier_dir)
  for key in ('kernel', 'bias'):
    np.testing.assert_array_equal(back[key], head[key])


def test_a_finetuned_checkpoint_exports_as_a_classifier(exported, tmp_path, monkeypatch):
  """export_checkpoint's side of the contract with aasp_jax.finetune.checkpoint (is_finetuned /
  load_finetuned), with a stand-in for the fine-tuning run."""
  model, _, _, head = exported
  finetuned = type(
    'Finetuned',
    (),
    dict(
      model_config=model.config.model.to_dict(),
      preset=model.preset,
      encoder_params=model.params,
      head_params=head,
      labels=LABELS,
      multilabel=False,
      step=30,
      source='ft_esc50',
      data='esc50 (ESC-50-master)',
    ),
  )
  calls = []

  class Checkpoints:
    @staticmethod
    def is_finetuned(path):
      return path == '/runs/ft_esc50'

    @staticmethod
    def load_finetuned(path, step=None):
      calls.append((path, step))
      return finetuned

  monkeypatch.setattr(exporter, 'finetune_checkpoints', lambda: Checkpoints)
  # A model.onnx left from an earlier export is not these weights: it is removed.
  (tmp_path / 'ft').mkdir()
  (tmp_path / 'ft' / 'model.onnx').write_bytes(b'an older graph')
  result = exporter.export_checkpoint('/runs/ft_esc50', tmp_path / 'ft', step=30)
  assert calls == [('/runs/ft_esc50', 30)] and (result.which, result.step) == ('finetuned', 30)
  assert not (tmp_path / 'ft' / 'model.onnx').exists()
  with pytest.raises(ValueError, match='does not apply; drop --which'):
    exporter.export_checkpoint('/runs/ft_esc50', tmp_path / 'ft2', which='student')
  config, _, _ = exporter.load_export(tmp_path / 'ft')
  assert config['problem_type'] == 'single_label_classification'
  assert config['data'] == 'esc50 (ESC-50-master)'
  # data.train as a list (sources.open_source takes one): each path by its last two parts.
  assert exporter._data_name(['/d/sonicpi/labels.csv', 'p/x/shards-*.rec']) == (
    'sonicpi/labels.csv, x/shards-*.rec'
  )
  assert config['source'] == 'ft_esc50' and config['id2label']['4'] == 'crickets'
  np.testing.assert_array_equal(
    exporter.head_from_export(tmp_path / 'ft')['kernel'], head['kernel']
  )
