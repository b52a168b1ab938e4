"""Exports of pre-trained AaSP encoders and fine-tuned classifiers (design doc section 7).

- `safetensors_io`: numpy-only safetensors reader/writer that validates every file it reads;
- `exporter`: checkpoint -> Hugging Face export folder (model.safetensors in the PyTorch layout,
  config.json, preprocessor_config.json, the model's code, README.md), its validating loader and
  the re-import into JAX; `model_card` renders the folder's README.md;
- `hf/`: the code every export folder carries, kept here once and copied verbatim: `aasp_torch`
  (the encoder, front end included, and the classifier in PyTorch; torch, numpy and safetensors
  only) and the transformers classes around it;
- `timm_layout`: the conv-stem encoder in timm / Audio-MAE tensor names, and faithful imports
  of timm / Audio-MAE weights (each position table);
- `eat_layout`: imports of EAT checkpoints (fairseq and Hugging Face names, post-LN blocks);
- `onnx_export`: ONNX graphs of the PyTorch model (dynamic batch and time), checked with
  onnxruntime;
- `cli`: the `aasp-export` command.

Nothing is imported here, so `aasp_jax.export.hf.aasp_torch` can be used where JAX is absent.
"""
