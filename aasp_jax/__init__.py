"""aasp-jax: AaSP (aliasing-aware self-supervised pre-training) for audio spectrogram transformers."""

try:
  import jax
except ImportError:  # aasp_jax.export.torch_model (an exported model in PyTorch) needs no JAX
  jax = None
else:
  # Per-step randomness is derived with fold_in and must not depend on how arrays are sharded.
  jax.config.update('jax_threefry_partitionable', True)

__version__ = '0.1.0'
