"""`aasp-export` end to end on a real tiny pre-training checkpoint (aasp_jax/export/cli.py)."""

import contextlib
import io
import json
import os
import shutil

import jax
import numpy as np
import pytest

from aasp_jax.evaluate import pretrained
from aasp_jax.export import cli, exporter, onnx_export, safetensors_io, timm_layout

pytest.importorskip('torch')
pytest.importorskip('onnx')
onnxruntime = pytest.importorskip('onnxruntime')

EXPECTED = {
  'model.safetensors',
  'config.json',
  'preprocessor_config.json',
  'README.md',
  'aasp_torch.py',
  'configuration_aasp.py',
  'modeling_aasp.py',
  'feature_extraction_aasp.py',
  'timm_model.safetensors',
  'model.onnx',
}


@pytest.fixture(scope='module')
def exported(tiny_checkpoints, tmp_path_factory):
  """(checkpoint, export folder, exit status, printed text) of one run with --timm --onnx."""
  checkpoint = tiny_checkpoints['conv']
  out = str(tmp_path_factory.mktemp('cli') / 'export')
  stdout = io.StringIO()  # capsys is function-scoped; the run is shared by the module
  with contextlib.redirect_stdout(stdout):
    status = cli.main([checkpoint, out, '--timm', '--onnx'])
  return checkpoint, out, status, stdout.getvalue()


def test_writes_every_file_and_reports_sizes_and_time(exported):
  _, out, status, text = exported
  assert status == 0, text
  assert set(os.listdir(out)) == EXPECTED
  for name in EXPECTED:
    size = os.path.getsize(os.path.join(out, name))
    assert size > 0
    assert name in text
  assert 'teacher encoder of step 2' in text
  assert 'wrote 10 files in' in text and ' s (' in text
  assert 'max relative error' in text and 'dynamic batch and time (up to 12000 frames)' in text
  # The card lists the optional files once they are written; config.json records timm's
  # constructor arguments.
  with open(os.path.join(out, 'README.md')) as f:
    card = f.read()
  assert '- `timm_model.safetensors`' in card and '- `model.onnx`' in card
  with open(os.path.join(out, 'config.json')) as f:
    timm_args = json.load(f)['timm']
  assert timm_args['img_size'] == [64, 128] and timm_args['embed_dim'] == 32


def test_no_pickle_is_written(exported):
  """torch.save files are zip archives ('PK') and raw pickles start with protocol byte 0x80."""
  _, out, _, _ = exported
  for name in os.listdir(out):
    with open(os.path.join(out, name), 'rb') as f:
      head = f.read(2)
    assert head != b'PK' and head[:1] != b'\x80', name
    assert not name.endswith(('.pt', '.pth', '.pkl', '.bin', '.ckpt'))


def test_files_hold_the_checkpoint_teacher(exported):
  """The native and timm files against the encoder load_pretrained reads from the checkpoint,
  and the ONNX graph against that encoder's JAX forward."""
  checkpoint, out, _, _ = exported
  model = pretrained.load_pretrained(checkpoint, which='teacher')
  _, preset, tensors = exporter.load_export(out)
  want = exporter.flatten_params(model.params)
  assert sorted(tensors) == sorted(want)
  assert all(np.array_equal(tensors[k], want[k]) for k in want)

  timm_tensors, metadata = safetensors_io.load(os.path.join(out, 'timm_model.safetensors'))
  assert metadata['layout'] == 'timm'
  expected = timm_layout.to_timm(
    model.params,
    model.config.model,
    target_length=preset['target_length'],
    num_mel_bins=preset['num_mel_bins'],
  )
  assert sorted(timm_tensors) == sorted(expected)
  assert all(np.array_equal(timm_tensors[k], expected[k]) for k in expected)

  # Twice the training window: the graph's time axis is dynamic.
  x = np.random.default_rng(0).standard_normal((2, 2 * preset['target_length'], 128), np.float32)
  session = onnxruntime.InferenceSession(
    os.path.join(out, 'model.onnx'), providers=['CPUExecutionProvider']
  )
  mask = np.ones(x.shape[:2], np.int32)  # every frame holds audio: nothing is masked
  cls, tokens = session.run(['cls', 'tokens'], {'log_mel': x, 'attention_mask': mask})
  jax_out = jax.tree.map(np.asarray, model.encoder.apply({'params': model.params}, x))
  assert np.max(np.abs(tokens - jax_out['tokens'])) / np.max(np.abs(jax_out['tokens'])) < 1e-4
  assert np.max(np.abs(cls - jax_out['cls'])) / np.max(np.abs(jax_out['cls'])) < 1e-4


def test_non_empty_out_dir_is_refused_without_force(exported, capsys):
  checkpoint, out, _, _ = exported
  before = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}
  with pytest.raises(SystemExit) as e:
    cli.main([checkpoint, out])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert 'not empty' in err and '--force' in err
  assert {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)} == before


def test_force_replaces_the_export_and_drops_stale_optional_files(exported, tmp_path, capsys):
  checkpoint, out, _, _ = exported
  target = tmp_path / 'again'
  shutil.copytree(out, target)
  (target / 'notes.txt').write_text('mine')
  assert cli.main([checkpoint, str(target), '--force', '--which', 'student']) == 0
  # The new export has no timm / ONNX file, so the stale ones must be gone; the user's file stays.
  assert set(os.listdir(target)) == EXPECTED - {'timm_model.safetensors', 'model.onnx'} | {
    'notes.txt'
  }
  with open(target / 'config.json') as f:
    assert json.load(f)['which'] == 'student'
  assert 'student encoder of step 2' in capsys.readouterr().out


def test_timm_layout_of_an_aape_checkpoint_is_refused_before_writing(exported, tmp_path, capsys):
  """The refusal reads the config saved with the checkpoint (here a conv run relabelled 'aape')."""
  checkpoint, _, _, _ = exported
  relabelled = tmp_path / 'aape_run'
  shutil.copytree(checkpoint, relabelled)
  meta = relabelled / 'checkpoints' / '2' / 'config' / 'metadata'
  config = json.loads(meta.read_text())
  config['model']['stem'] = 'aape'
  meta.write_text(json.dumps(config))
  out = tmp_path / 'out'
  with pytest.raises(SystemExit) as e:
    cli.main([str(relabelled), str(out), '--timm'])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "stem is 'aape'" in err and 'Drop --timm' in err
  assert not out.exists()


@pytest.mark.parametrize(
  'argv, needle',
  [
    (['--step', '-3'], 'a step is >= 0'),
    (['--step', 'last'], 'not a step number'),
    (['--which', 'both'], 'invalid choice'),
    (['--onnx', '--unknown'], 'unrecognized arguments'),
  ],
)
def test_bad_arguments_exit_2_with_a_message(exported, tmp_path, capsys, argv, needle):
  checkpoint, _, _, _ = exported
  with pytest.raises(SystemExit) as e:
    cli.main([checkpoint, str(tmp_path / 'out'), *argv])
  assert e.value.code == 2
  assert needle in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()


def test_missing_checkpoint_or_step_exits_1(exported, tmp_path, capsys):
  checkpoint, _, _, _ = exported
  assert cli.main([str(tmp_path / 'no_run'), str(tmp_path / 'a')]) == 1
  assert 'no such checkpoint folder' in capsys.readouterr().err
  assert cli.main([checkpoint, str(tmp_path / 'b'), '--step', '7']) == 1
  assert 'no checkpoint of step 7' in capsys.readouterr().err


def test_an_onnx_graph_that_fails_its_check_is_refused_and_not_left_behind(
  exported, tmp_path, capsys, monkeypatch
):
  """A graph over the tolerance (forced here with a tolerance no graph meets) exits 1, names the
  file it refused, and leaves neither model.onnx nor its unchecked temporary; the weights stay."""
  checkpoint, _, _, _ = exported
  monkeypatch.setattr(onnx_export, 'CHECK_TOLERANCE', 0.0)
  out = tmp_path / 'refused'
  assert cli.main([checkpoint, str(out), '--onnx']) == 1
  err = capsys.readouterr().err
  assert f'{out / "model.onnx"}: refused and not written' in err and 'above 0' in err
  assert not [n for n in os.listdir(out) if n.startswith('model.onnx')]
  assert 'model.safetensors' in os.listdir(out)
