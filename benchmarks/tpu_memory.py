"""Per-chip HBM and step FLOPs of the shipped pre-training configs on TPU slices, from an AOT
compile on this host (no TPU needed, only libtpu: pip install -e '.[tpu]').

  python benchmarks/tpu_memory.py                      # every case below; several minutes each
  python benchmarks/tpu_memory.py --only base_v5e      # the cases whose name contains a string

Each case compiles the real train step (`aasp_jax.train.aot.compile_for_topology`) and prints its
report, then one summary table. XLA:TPU refuses to compile a step that overflows a chip's HBM;
such a case's row says so with XLA's message. JAX_PLATFORMS=cpu keeps this process from probing
for a local TPU.
"""

import argparse
import dataclasses
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # libtpu is only the compiler here, never a device

from aasp_jax import configuration  # noqa: E402
from aasp_jax.train import aot  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(REPO_ROOT, 'configs', 'pretrain_base.py')
LARGE = os.path.join(REPO_ROOT, 'configs', 'pretrain_large.py')
# Mesh overrides. 512 clips is a per-chip batch of 8 on 64 chips and 2 on 256.
DP = ('mesh.data=-1', 'mesh.fsdp=1')
FSDP = ('mesh.data=1', 'mesh.fsdp=-1')


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  config: str
  topology: str
  global_batch: int
  overrides: tuple[str, ...] = ()  # on top of the config's own mesh
  fallback_for: str | None = None  # run only when this case does not fit


CASES = (
  # v5p-128 (64 chips, 95 GiB each): base data-parallel, large with its config's FSDP.
  Case('base_v5p64_dp', BASE, 'v5p:4x4x4', 512, DP),
  Case('large_v5p64_fsdp', LARGE, 'v5p:4x4x4', 512),
  # v5e-256 (256 chips, 16 GiB each): base data-parallel (with FSDP only if that overflows); large
  # with FSDP in groups of 64 chips, since its predictor's 384 wide kernels do not divide by 256.
  Case('base_v5e256_dp', BASE, 'v5e:16x16', 512, DP),
  Case('large_v5e256_fsdp64', LARGE, 'v5e:16x16', 512, ('mesh.data=4', 'mesh.fsdp=-1')),
  Case('base_v5e256_fsdp', BASE, 'v5e:16x16', 512, FSDP, fallback_for='base_v5e256_dp'),
)


def run_case(case: Case):
  """(report, None), or (None, the error) for a step XLA cannot fit into one chip's HBM."""
  cfg = configuration.load_config(
    case.config, [f'global_batch={case.global_batch}', *case.overrides]
  )
  try:
    return aot.compile_for_topology(cfg, case.topology), None
  except aot.HbmOverflowError as e:  # a result, not a failure of the benchmark
    return None, str(e)


def summary_row(case: Case, report, error) -> str:
  config = os.path.basename(case.config).removesuffix('.py')
  head = f'{case.name:<20}{config:<16}{case.topology:<11}{case.global_batch:>6} '
  if report is None:
    return f'{head}  does not fit: {error.split("XLA: ")[-1][:90]}'
  r = report
  mesh = 'x'.join(str(v) for v in r.mesh_shape.values())
  pct = 100 * r.peak_bytes / r.hbm_bytes
  return (
    f'{head}{mesh:>10}{r.peak_bytes / aot.GIB:>9.2f}{r.hbm_bytes / aot.GIB:>7.0f}{pct:>7.1f}%'
    f'{"yes" if r.fits else "NO":>6}{r.flops_per_chip / 1e12:>11.2f}{r.compile_seconds:>10.0f}'
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', default='', help='run the cases whose name contains this string')
  args = parser.parse_args()
  cases = [c for c in CASES if args.only in c.name]
  if not cases:
    sys.exit(f'No case matches {args.only!r}; cases: {[c.name for c in CASES]}')
  rows, fitted = [], {}
  for case in cases:
    if case.fallback_for and fitted.get(case.fallback_for, False):
      continue
    print(f'=== {case.name}: {case.config} on {case.topology}, global batch {case.global_batch}')
    report, error = run_case(case)
    fitted[case.name] = bool(report and report.fits)
    print(aot.format_report(report) if report else error, flush=True)
    rows.append(summary_row(case, report, error))
  print()
  print(
    f'{"case":<20}{"config":<16}{"topology":<11}{"batch":>6} {"mesh d/f/t":>10}{"peak GiB":>9}'
    f'{"HBM":>7}{"% HBM":>8}{"fits":>6}{"TFLOP/chip":>11}{"compile s":>10}'
  )
  print('\n'.join(rows))


if __name__ == '__main__':
  main()
