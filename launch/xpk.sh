#!/usr/bin/env bash
# Pre-train on TPU slices in a GKE cluster through xpk (https://github.com/AI-Hypercomputer/xpk).
#
# Usage: launch/xpk.sh COMMAND... [--flag=VALUE...] [--dry-run] [-- TRAINER_ARGS...]
#
# Commands (several run in the order given, e.g. `cluster-create run`):
#   cluster-create  xpk cluster create: NUM_SLICES slices of TPU_TYPE (Spot with --spot, a
#                   reservation with RESERVATION, on-demand otherwise); with DATA_BUCKET also the
#                   Cloud Storage FUSE CSI driver (--enable-gcsfuse-csi-driver)
#   storage-attach  xpk storage attach: DATA_BUCKET as a read-only Cloud Storage FUSE volume
#                   aasp-data-DATA_BUCKET mounted at /gcs/DATA_BUCKET (once per cluster)
#   run             xpk workload create: every host of every slice runs aasp-pretrain
#                   --config=CONFIG --workdir=WORKDIR --distributed=auto TRAINER_ARGS...
#                   (with BASE_DOCKER_IMAGE it first installs the package: pip install -e '.[tpu]');
#                   with DATA_BUCKET the workload mounts the attached volume (--storage=)
#   delete          xpk workload delete WORKLOAD
#   cluster-delete  xpk cluster delete
#
# Each variable comes from the environment or from its flag (the flag wins):
#   CLUSTER            --cluster=            GKE cluster name (required)
#   ZONE               --zone=               zone of the TPUs, e.g. us-east5-a (required)
#   PROJECT            --project=            GCP project (default: gcloud's configured project)
#   TPU_TYPE           --tpu-type=           slice type (default v5p-64: 32 chips, 8 hosts)
#   NUM_SLICES         --num-slices=         slices; more than one is Multislice over DCN, which jax
#                                            detects from xpk's environment (default 1)
#   SPOT               --spot                1: cluster-create asks for Spot capacity (default 0)
#   RESERVATION        --reservation=        cluster-create uses this reservation (default: unset)
#   WORKLOAD           --workload=           workload name, lower case, digits and '-' (required by
#                                            run and delete)
#   BUCKET             --bucket=             GCS bucket, no gs:// (required by run without WORKDIR)
#   DATA_BUCKET        --data-bucket=        bucket of the training data, no gs://, read through
#                                            Cloud Storage FUSE at /gcs/DATA_BUCKET (default: unset)
#   WORKDIR            --workdir=            checkpoints and logs (default
#                                            gs://BUCKET/aasp/WORKLOAD)
#   CONFIG             --config=             config file[:arg] (default configs/pretrain_base.py)
#   DOCKER_IMAGE       --docker-image=       a ready image: the package installed, the repo as its
#                                            working directory (default: unset)
#   BASE_DOCKER_IMAGE  --base-docker-image=  without DOCKER_IMAGE, xpk layers this repo onto this
#                                            image and the workload installs the package at start
#                                            (default python:3.12-slim)
#   MAX_RESTARTS       --max-restarts=       restarts after a failure or preemption; each one
#                                            resumes from the latest checkpoint (default 10)
#   PRIORITY           --priority=           very-low, low, medium, high or very-high (default
#                                            medium)
#   DRY_RUN            --dry-run             1: print every command, one per line, run nothing
#
# TRAINER_ARGS after `--` go to aasp-pretrain unchanged, e.g.
#   -- --config.global_batch=512 --config.data.train='/gcs/DATA_BUCKET/shards/clips-*.array_record'
# The trainer reads data through the file system, so data paths name the mount (/gcs/...), never
# gs://; the workdir stays gs://BUCKET/... (checkpoints are written to GCS directly). The
# workload's service account must be allowed to read DATA_BUCKET (roles/storage.objectViewer).
#
# Example:
#   launch/xpk.sh run --cluster=aasp --zone=us-east5-a --workload=aasp-b16 --bucket=my-bucket \
#       --dry-run
#   launch/xpk.sh cluster-create storage-attach run --cluster=aasp --zone=us-east5-a \
#       --workload=aasp-b16 --bucket=my-bucket --data-bucket=my-data --dry-run -- \
#       --config.data.train='/gcs/my-data/shards/clips-*.array_record'
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCH_DIR")
# shellcheck source=launch/common.sh
source "$LAUNCH_DIR/common.sh"

CLUSTER=${CLUSTER:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
TPU_TYPE=${TPU_TYPE:-v5p-64}
NUM_SLICES=${NUM_SLICES:-1}
SPOT=${SPOT:-0}
RESERVATION=${RESERVATION:-}
WORKLOAD=${WORKLOAD:-}
BUCKET=${BUCKET:-}
DATA_BUCKET=${DATA_BUCKET:-}
WORKDIR=${WORKDIR:-}
CONFIG=${CONFIG:-configs/pretrain_base.py}
DOCKER_IMAGE=${DOCKER_IMAGE:-}
BASE_DOCKER_IMAGE=${BASE_DOCKER_IMAGE:-python:3.12-slim}
MAX_RESTARTS=${MAX_RESTARTS:-10}
PRIORITY=${PRIORITY:-medium}
DRY_RUN=${DRY_RUN:-0}

COMMAND_NAMES='cluster-create, storage-attach, run, delete or cluster-delete'
COMMANDS=()
TRAINER_ARGS=()
while (($#)); do
  if [[ "$1" == -- ]]; then
    shift
    TRAINER_ARGS=("$@")
    break
  fi
  split_flag "$1"
  shift
  case "$FLAG" in
    -h | --help) usage ;;
    --dry-run) DRY_RUN=1; continue ;;
    --spot) SPOT=1; continue ;;
    -*) ((HAS_VALUE)) || die "$FLAG takes a value: $FLAG=VALUE" ;;
  esac
  case "$FLAG" in
    --cluster) CLUSTER=$VALUE ;;
    --zone) ZONE=$VALUE ;;
    --project) PROJECT=$VALUE ;;
    --tpu-type) TPU_TYPE=$VALUE ;;
    --num-slices) NUM_SLICES=$VALUE ;;
    --reservation) RESERVATION=$VALUE ;;
    --workload) WORKLOAD=$VALUE ;;
    --bucket) BUCKET=$VALUE ;;
    --data-bucket) DATA_BUCKET=$VALUE ;;
    --workdir) WORKDIR=$VALUE ;;
    --config) CONFIG=$VALUE ;;
    --docker-image) DOCKER_IMAGE=$VALUE ;;
    --base-docker-image) BASE_DOCKER_IMAGE=$VALUE ;;
    --max-restarts) MAX_RESTARTS=$VALUE ;;
    --priority) PRIORITY=$VALUE ;;
    -*) die "unknown flag: $FLAG" ;;
    cluster-create | storage-attach | run | delete | cluster-delete) COMMANDS+=("$FLAG") ;;
    *) die "unknown command: $FLAG ($COMMAND_NAMES)" ;;
  esac
done

((${#COMMANDS[@]})) || die "no command given ($COMMAND_NAMES)"
require "$CLUSTER" '--cluster (CLUSTER)'
require "$ZONE" '--zone (ZONE)'
[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "--num-slices (NUM_SLICES) must be a positive integer"
case " ${COMMANDS[*]} " in
  *' run '* | *' delete '*) require "$WORKLOAD" '--workload (WORKLOAD)' ;;
esac
case " ${COMMANDS[*]} " in
  *' run '*)
    if [[ -z "$WORKDIR" ]]; then
      require "$BUCKET" '--bucket (BUCKET) or --workdir (WORKDIR)'
      WORKDIR="gs://${BUCKET#gs://}/aasp/$WORKLOAD"
    fi
    ;;
esac

DATA_BUCKET=${DATA_BUCKET#gs://}
DATA_BUCKET=${DATA_BUCKET%%/*}
if [[ -n "$DATA_BUCKET" && ! "$DATA_BUCKET" =~ ^[a-z0-9][a-z0-9._-]*$ ]]; then
  die "--data-bucket (DATA_BUCKET) must be a bucket name, got '$DATA_BUCKET'"
fi
case " ${COMMANDS[*]} " in
  *' storage-attach '*) require "$DATA_BUCKET" '--data-bucket (DATA_BUCKET)' ;;
esac
# The xpk storage name: a Kubernetes name, so the bucket's '.' and '_' become '-'.
STORAGE="aasp-data-${DATA_BUCKET//[._]/-}"

WHERE=(--cluster="$CLUSTER" --zone="$ZONE")
[[ -z "$PROJECT" ]] || WHERE+=(--project="$PROJECT")

do_cluster_create() {
  local capacity=(--on-demand)
  [[ -z "$RESERVATION" ]] || capacity=(--reservation="$RESERVATION")
  [[ "$SPOT" != 1 ]] || capacity=(--spot)
  [[ -z "$DATA_BUCKET" ]] || capacity+=(--enable-gcsfuse-csi-driver)
  run xpk cluster create "${WHERE[@]}" --tpu-type="$TPU_TYPE" --num-slices="$NUM_SLICES" \
    "${capacity[@]}"
}

do_storage_attach() {
  # --size is the volume's nominal capacity, which Kubernetes requires and gcsfuse ignores.
  run xpk storage attach "$STORAGE" "${WHERE[@]}" --type=gcsfuse --bucket="$DATA_BUCKET" \
    --mount-point="/gcs/$DATA_BUCKET" --readonly=true --auto-mount=false --size=1
}

do_run() {
  local trainer image
  # `auto` reads what GKE and xpk put in each pod's environment (TPU_WORKER_HOSTNAMES, MEGASCALE_*
  # for Multislice), the same variables jax.distributed's own detection uses there.
  trainer=$(quote aasp-pretrain --config="$CONFIG" --workdir="$WORKDIR" --distributed=auto \
    ${TRAINER_ARGS[@]+"${TRAINER_ARGS[@]}"})
  if [[ -n "$DOCKER_IMAGE" ]]; then
    image=(--docker-image="$DOCKER_IMAGE")
  else
    # xpk copies --script-dir into the base image and starts in it, so an editable install there
    # gives the trainer this exact tree (the configs included).
    image=(--base-docker-image="$BASE_DOCKER_IMAGE" --script-dir="$REPO_ROOT")
    trainer="python3 -m pip install --quiet --root-user-action=ignore -e '.[tpu]' && $trainer"
  fi
  [[ -z "$DATA_BUCKET" ]] || image+=(--storage="$STORAGE")
  run xpk workload create "${WHERE[@]}" --workload="$WORKLOAD" --tpu-type="$TPU_TYPE" \
    --num-slices="$NUM_SLICES" --max-restarts="$MAX_RESTARTS" --priority="$PRIORITY" \
    "${image[@]}" --command "$trainer"
}

do_delete() {
  run xpk workload delete "${WHERE[@]}" --workload="$WORKLOAD"
}

do_cluster_delete() {
  run xpk cluster delete "${WHERE[@]}"
}

for command in "${COMMANDS[@]}"; do
  "do_${command//-/_}"
done
