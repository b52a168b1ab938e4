"""Exports of pre-trained AaSP encoders (design doc section 7).

- `safetensors_io`: numpy-only safetensors reader/writer that validates every file it reads;
- `exporter`: checkpoint -> export folder (model.safetensors, config.json,
  preprocessor_config.json, README.md), its validating loader and the re-import into JAX;
- `torch_model`: the encoder, front end included, rebuilt in PyTorch from an export folder
  (imports neither JAX nor Flax);
- `timm_layout`: the conv-stem encoder in timm / Audio-MAE tensor names;
- `onnx_export`: ONNX graphs of the PyTorch encoder, checked with onnxruntime;
- `cli`: the `aasp-export` command.

Nothing is imported here, so `aasp_jax.export.torch_model` can be used where JAX is absent.
"""
