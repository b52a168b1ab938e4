"""aasp-jax: AaSP (aliasing-aware self-supervised pre-training) for audio spectrogram transformers."""

import jax

# Per-step randomness is derived with fold_in and must not depend on how arrays are sharded.
jax.config.update('jax_threefry_partitionable', True)

__version__ = '0.1.0'
