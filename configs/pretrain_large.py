"""AaSP ViT-L/16 pre-training: the base recipe with a 24-block, 1024-wide encoder, per-block remat and
FSDP, so the optimizer state is split across the data-parallel devices instead of replicated.

  v5p-64 slice (data bucket mounted at /gcs/BUCKET by launch/tpu_vm.sh --data-bucket=BUCKET):
    aasp-pretrain --config=configs/pretrain_large.py --workdir=gs://BUCKET/aasp_l16 \
        --config.data.train='/gcs/BUCKET/shards/clips-*.array_record' --config.global_batch=512 \
        --config.data.num_workers=8
  8x H100:
    aasp-pretrain --config=configs/pretrain_large.py --workdir=/ckpt/aasp_l16 \
        --config.data.train=/data/shards/train-*.array_record --config.global_batch=96
  Check that it fits a slice without one (prints per-chip memory and FLOPs):
    aasp-pretrain --config=configs/pretrain_large.py --workdir=/tmp/aot --compile_only \
        --topology=v5p:4x4x4 --config.global_batch=512
"""

from configs import pretrain


def get_config(arg: str | None = None):
  config = pretrain.get_config('variant=L/16' + (',' + arg if arg else ''))
  config.model.remat = True
  # FSDP over every device: parameters and AdamW moments are sharded along 'embed'.
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.global_batch = 48
  return config
