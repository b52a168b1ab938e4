"""AOT compilation of the real train step for a TPU slice on a CPU host (aasp_jax.train.aot).

The slow test compiles configs/pretrain_base.py (ViT-B/16, AaPE stem, 16 clones) for a v5p-16
slice (v5p:2x2x2, 8 chips) and checks XLA's per-chip figures against estimates made here from the
parameter count alone: the data-parallel state must be fully resident on every chip and donated,
and the step's FLOPs must be close to 6 * params * tokens. Tests that need libtpu skip, with the
install command, where it is missing; the name and report checks need nothing.
"""

import dataclasses
import importlib.util
import math

import jax
import pytest

from aasp_jax import configuration
from aasp_jax.configuration import ConfigError
from aasp_jax.train import aot
from aasp_jax.train import objective as objective_lib
from aasp_jax.train import optimizer
from aasp_jax.train import state as state_lib

TOPOLOGY = 'v5p:2x2x2'  # 8 chips of 95 GiB
CHIPS = 8
GLOBAL_BATCH = 8  # one clip per chip: the smallest batch the data-parallel mesh takes
BASE = 'configs/pretrain_base.py'
TINY = 'configs/pretrain.py:variant=tiny,target_length=64'


def skip_without_libtpu():
  if importlib.util.find_spec('libtpu') is None:
    pytest.skip(
      "libtpu is not installed, so nothing can compile for a TPU topology: pip install -e '.[tpu]'"
    )


@pytest.fixture
def libtpu():
  skip_without_libtpu()


@pytest.fixture(scope='module')
def base_report():
  """(config, report) for the real base config on v5p:2x2x2; compiled once for the module."""
  skip_without_libtpu()
  # Scanned blocks (the base config's default) compile in ~3-4 min on 2 CPU cores; unrolled they
  # took 10-15 min.
  cfg = configuration.load_config(BASE, [f'global_batch={GLOBAL_BATCH}'])
  return cfg, aot.compile_for_topology(cfg, TOPOLOGY)


def parameter_counts(cfg) -> tuple[int, int]:
  """(all student parameters, encoder parameters) from the abstract state; nothing compiles."""
  objective = objective_lib.AaSPObjective.from_config(cfg)
  tx, _ = optimizer.make_optimizer(cfg.optimizer, cfg.global_batch, cfg.total_steps)
  state = state_lib.abstract_state(objective, tx)
  return _size(state.params), _size(state.teacher)


def _size(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def analytic_step_flops_per_clip(cfg, params: int, encoder: int) -> float:
  """6 N tokens for what is trained, 2 N tokens for the teacher's forward pass.

  Per clip: the student encodes M clones of Nv visible tokens (+ CLS); the predictor (every
  non-encoder parameter) works per token of the clip for each clone; the teacher sees all N + 1.
  Attention scores are left out (a few percent at these lengths).
  """
  m = cfg.model
  n = (cfg.frontend.target_length // m.patch_t) * (128 // m.patch_f)  # 128 mel bins
  clones = cfg.objective.num_clones
  visible = round((1 - cfg.objective.mask_ratio) * n)
  student = 6 * encoder * clones * (visible + 1)
  predictor = 6 * (params - encoder) * clones * n
  teacher = 2 * encoder * (n + 1)
  return student + predictor + teacher


@pytest.mark.tpu
@pytest.mark.slow
def test_base_config_fits_v5p_with_the_state_on_every_chip(base_report):
  cfg, r = base_report
  check_report(cfg, r)
  assert r.fits and r.peak_bytes < 0.2 * r.hbm_bytes  # ViT-B at one clip per chip: ~3.4 GiB of 95


def check_report(cfg, r) -> None:
  assert (r.topology, r.chip_kind, r.num_chips) == (TOPOLOGY, 'TPU v5', CHIPS)
  assert r.mesh_shape == {'data': CHIPS, 'fsdp': 1, 'tensor': 1}
  assert r.global_batch == GLOBAL_BATCH

  params, encoder = parameter_counts(cfg)
  # float32 student + teacher + AdamW's two moments; data parallel keeps all of it on every chip
  # (the parameter shards divide by fsdp * tensor = 1 here).
  state_bytes = 4 * (3 * params + encoder) / (r.mesh_shape['fsdp'] * r.mesh_shape['tensor'])
  assert r.argument_bytes >= state_bytes
  assert r.argument_bytes <= 1.01 * state_bytes + 2**20  # + one clip of waveform (0.7 MB)
  # Donation: the new state is written over the old one, so it is not counted twice.
  assert r.alias_bytes >= 0.99 * state_bytes
  assert r.peak_bytes >= r.argument_bytes + r.temp_bytes
  assert r.hbm_bytes == 95 * aot.GIB
  assert r.fits

  # The step's FLOPs shared over the chips: one clip per chip here.
  clips_per_chip = GLOBAL_BATCH / CHIPS
  expected = clips_per_chip * analytic_step_flops_per_clip(cfg, params, encoder)
  assert 0.5 < r.flops_per_chip / expected < 2.0, (r.flops_per_chip, expected)

  text = aot.format_report(r)
  assert TOPOLOGY in text and 'fits' in text and 'TFLOP per chip' in text


@pytest.mark.tpu
def test_global_batch_must_divide_the_slice(libtpu):
  cfg = configuration.load_config(BASE, ['global_batch=12'])
  with pytest.raises(ConfigError, match='not divisible by the 8 batch shards'):
    aot.compile_for_topology(cfg, TOPOLOGY)  # fails before anything is traced


@pytest.mark.tpu
def test_a_shape_libtpu_rejects_is_a_config_error(libtpu):
  cfg = configuration.load_config(BASE)
  with pytest.raises(ConfigError, match="libtpu rejected the topology 'v5p:3x3x3'"):
    aot.compile_for_topology(cfg, 'v5p:3x3x3')


@pytest.mark.parametrize('name', ['v9z:2x2', 'v5litepod-16', 'v5p'])
def test_unknown_topology_names_the_generations(name):
  cfg = configuration.load_config(BASE)
  with pytest.raises(ConfigError, match=r"Unknown TPU topology .*'v5e', 'v5p'"):
    aot.compile_for_topology(cfg, name)


def test_missing_libtpu_says_how_to_install(monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util,
    'find_spec',
    lambda name, *a: None if name == 'libtpu' else real_find_spec(name, *a),
  )
  monkeypatch.delenv('TPU_LIBRARY_PATH', raising=False)
  with pytest.raises(ConfigError, match=r"pip install -e '\.\[tpu\]'"):
    aot.compile_for_topology(configuration.load_config(BASE), 'v5p:2x2x2')


def test_format_report_gives_gib_percent_of_hbm_and_tflops():
  gib = aot.GIB
  report = aot.AotReport(
    topology='v5e:16x16',
    chip_kind='TPU v5 lite',
    num_chips=256,
    mesh_shape={'data': 256, 'fsdp': 1, 'tensor': 1},
    global_batch=512,
    argument_bytes=2 * gib,
    output_bytes=2 * gib,
    temp_bytes=10 * gib,
    alias_bytes=2 * gib,
    generated_code_bytes=gib // 4,
    peak_bytes=12 * gib + gib // 4,
    hbm_bytes=16 * gib,
    fits=True,
    flops_per_chip=3.5e12,
    compile_seconds=12.0,
  )
  text = aot.format_report(report)
  assert '256 x TPU v5 lite (16.0 GiB HBM each)' in text
  assert 'global batch 512 (2 per chip)' in text
  assert '12.25' in text and '76.6%' in text  # peak GiB and its share of HBM
  assert 'fits; headroom 3.75 GiB' in text
  assert '3.50 TFLOP per chip, 896.0 TFLOP global' in text
  overflow = dataclasses.replace(report, peak_bytes=17 * gib, fits=False)
  assert 'DOES NOT FIT' in aot.format_report(overflow)


@pytest.mark.tpu
def test_a_step_over_hbm_is_reported_with_xla_message_and_remedies(libtpu, monkeypatch):
  xla = (
    'RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory '
    'required for HLO temporaries (18.64G) exceeds available HBM (15.75G).'
  )

  def compile_traced(*args, **kwargs):  # what XLA:TPU raises; the real compile takes minutes
    raise jax.errors.JaxRuntimeError(xla)

  monkeypatch.setattr(aot.step_lib, 'compile_traced', compile_traced)
  cfg = configuration.load_config(TINY, ['global_batch=4'])
  with pytest.raises(aot.HbmOverflowError, match=r'(?s)v5e:2x2: .*\(18.64G\).*mesh.fsdp=-1'):
    aot.compile_for_topology(cfg, 'v5e:2x2')


@pytest.mark.tpu
def test_a_parameter_the_mesh_does_not_divide_is_a_config_error(libtpu):
  # FSDP over all 256 chips of a v5e-256 splits every 'embed' dimension 256 ways; tiny's are 128.
  cfg = configuration.load_config(TINY, ['global_batch=256', 'mesh.data=1', 'mesh.fsdp=-1'])
  with pytest.raises(ConfigError, match=r'v5e:16x16: .* sharded over .*256 devices'):
    aot.compile_for_topology(cfg, 'v5e:16x16')
