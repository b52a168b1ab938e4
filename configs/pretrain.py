"""AaSP pre-training config: one file for a CPU, 8 GPUs or a TPU pod, changed by overrides only.

Train (data.train is required: a folder, a manifest or packed shards):
  aasp-pretrain --config=configs/pretrain.py:variant=B/16 --workdir=/tmp/aasp \
      --config.data.train=/data/audioset/shards/train-*.array_record
Inspect it (resolved config plus the abstract parameter count of its models):
  python -m aasp_jax.configuration configs/pretrain.py:variant=B/16,stem=aape

Arguments (after ':'): variant=tiny|S|B|L[/patch], stem=aape|conv, predictor=cross_attention|cnn,
target_length=<frames, a multiple of the patch>, recipe=aasp|eat|mae (`common.apply_recipe`, applied
after stem and predictor, so recipe=eat sets the conv stem and CNN decoder whatever they say).
"""

from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(
    arg,
    variant='B/16',
    stem='aape',
    predictor='cross_attention',
    target_length=1024,
    recipe='aasp',
  )
  config = common.ConfigDict()
  config.seed = 0
  config.model = common.model_config(args.variant, args.stem, args.predictor)
  config.frontend = common.frontend_config('eat_audiomae', args.target_length)
  config.objective = common.objective_config(config.model.depth)
  config.optimizer = common.optimizer_config()
  # Everything below is written against the global batch: the per-host batch is global_batch /
  # processes and the learning rate scales with it, so a CPU, 8 GPUs and a pod share this file.
  config.global_batch = 48
  config.total_steps = 400_000
  config.mesh = common.mesh_config()
  config.logical_axis_rules = common.logical_axis_rules()
  config.data = common.data_config()
  config.checkpoint = common.checkpoint_config()
  config.logging = common.logging_config()
  config.probe = common.probe_config()
  return common.apply_recipe(config, args.recipe)
