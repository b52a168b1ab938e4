"""The code every export folder carries, kept here once and copied verbatim (exporter.CODE_FILES).

- `aasp_torch`: the encoder (front end, stems, blocks, pooling) and the classifier in PyTorch;
  imports only torch, numpy and safetensors;
- `configuration_aasp`, `modeling_aasp`, `feature_extraction_aasp`: the Hugging Face transformers
  classes around it (`AutoModel` / `AutoFeatureExtractor` with `trust_remote_code=True`).

Nothing is imported here: `aasp_jax.export.hf.aasp_torch` needs no transformers, and writing an
export needs neither torch nor transformers.
"""
