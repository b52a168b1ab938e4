"""The Hugging Face configuration of an AaSP export: config.json as a `PretrainedConfig`.

config.json holds, besides transformers' own fields (`model_type`, `architectures`, `auto_map`,
`id2label`, ...), the aasp-jax sections the PyTorch module is built from: 'model' (the
architecture), 'frontend' (the front-end preset) and 'tensors' (every weight's shape), and what the
export was made from ('which', 'step', 'source', 'data', 'aasp_jax_version').
"""

from transformers import PretrainedConfig


class AaSPConfig(PretrainedConfig):
  """An AaSP audio encoder (and optional classification head).

  Attributes:
    model: the encoder's architecture (aasp-jax's config `model` section).
    frontend: the front-end preset (sample rate, Kaldi log-mel options, window, normalisation).
    tensors: {weight name: shape} of model.safetensors.
  """

  model_type = 'aasp'

  model: dict | None = None
  frontend: dict | None = None
  tensors: dict | None = None
