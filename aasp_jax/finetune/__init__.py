"""Fine-tuning: training a pre-trained encoder with a classifier head on a labelled task, and using
the classifier it writes (README "Fine-tuning").

- `trainer`: `Finetuner` (mesh, state, checkpoints, loop, evaluation) and `aasp-finetune`'s run;
- `step`: the classifier model, the layer-decayed AdamW and the jitted train / eval steps;
- `data`: the dataset splits, the balanced sampler and the resumable training stream;
- `checkpoint`: what a run's checkpoints hold for the classifier, `load_finetuned` and `logits`;
- `cli` / `predict`: the `aasp-finetune` and `aasp-predict` commands.
"""
