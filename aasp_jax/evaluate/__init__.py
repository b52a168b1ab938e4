"""Evaluation of pre-trained encoders (README "Evaluation").

- `pretrained`: the encoder of a training checkpoint (teacher or student), or a random one;
- `embed` / `hear` / `embed_cli`: scene and timestamp embeddings of audio of any length, the HEAR
  2021 API and the `aasp-embed` command;
- `embeddings` / `linear_probe`: fixed-window clip embeddings and the L-BFGS probe the trainer's
  online evaluation and the main job use;
- `linear_eval` / `linear_eval_cli`: linear evaluation over seeds with cached embeddings;
- `augment` and `datasets`: mixup / SpecAugment / token dropping and the readers of the downstream
  datasets' layouts, which fine-tuning (`aasp_jax.finetune`) uses;
- `metrics`: accuracy, mAP, d-prime;
- `aliasing` / `aliasing_cli`: the aliasing-stability study (`aasp-aliasing`).
"""
