"""aasp-jax: AaSP (aliasing-aware self-supervised pre-training) for audio spectrogram transformers."""

import glob
import importlib.metadata
import importlib.util
import os


def _host_without_tpu() -> bool:
  """True on a host where libtpu is installed (the `test` and `tpu` extras: it is the TPU
  compiler) but no TPU chip is attached and no GPU plugin is installed, e.g. a CPU workstation.

  There, JAX would probe libtpu for chips at its first device query and libtpu prints a screen of
  errors ('could not determine TPU accelerator type', 'unexpected worker hostname ...') before JAX
  falls back to the CPU. TPU VMs expose their chips as /dev/accel* (v4, v5p) or /dev/vfio/*
  (v5e, v6e); GKE also sets TPU_ACCELERATOR_TYPE. An explicit JAX_PLATFORMS is always kept.
  """
  if os.environ.get('JAX_PLATFORMS') or os.environ.get('TPU_ACCELERATOR_TYPE'):
    return False
  if glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'):
    return False
  if importlib.util.find_spec('libtpu') is None:
    return False
  # GPU backends (CUDA, ROCm) are PJRT plugins registered under this entry-point group.
  return not importlib.metadata.entry_points(group='jax_plugins')


try:
  import jax
except ImportError:  # an exported model in PyTorch needs no JAX
  jax = None
else:
  # Per-step randomness is derived with fold_in and must not depend on how arrays are sharded.
  jax.config.update('jax_threefry_partitionable', True)
  if _host_without_tpu():
    # Only the CPU backend is started; libtpu still compiles for TPU topologies
    # (aasp-pretrain --compile_only --topology=...), which never opens a chip.
    jax.config.update('jax_platforms', 'cpu')

__version__ = '0.1.0'
