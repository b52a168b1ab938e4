"""AaSP ViT-B/16 pre-training (the paper's main model): one file for a TPU pod, 8 GPUs or a CPU.

The settings are written against the global batch; only these overrides change between machines:
  v5p-64 slice (32 chips, 8 hosts; `launch/tpu_vm.sh --data-bucket=BUCKET` mounts the data at /gcs):
    aasp-pretrain --config=configs/pretrain_base.py --workdir=gs://BUCKET/aasp_b16 \
        --config.data.train='/gcs/BUCKET/shards/clips-*.array_record' --config.global_batch=512 \
        --config.data.num_workers=8
  8x H100 (one host, or one process per GPU under SLURM):
    aasp-pretrain --config=configs/pretrain_base.py --workdir=/ckpt/aasp_b16 \
        --config.data.train=/data/shards/train-*.array_record --config.global_batch=96 \
        --config.model.attention_impl=cudnn
  1 CPU (a smoke run):
    aasp-pretrain --config=configs/pretrain_base.py --workdir=/tmp/aasp_b16 \
        --config.data.train=data/sonicpi/audio --config.global_batch=2 --config.total_steps=10
The peak learning rate scales linearly with global_batch (5e-4 at 48 clips), so changing the batch
keeps the recipe.
"""

from configs import pretrain


def get_config(arg: str | None = None):
  config = pretrain.get_config('variant=B/16' + (',' + arg if arg else ''))
  config.global_batch = 48
  return config
