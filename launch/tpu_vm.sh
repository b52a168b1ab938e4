#!/usr/bin/env bash
# Pre-train on a Cloud TPU VM slice: create it, put this repo on every host, install, train, delete.
#
# Usage: launch/tpu_vm.sh COMMAND... [--flag=VALUE...] [--dry-run] [-- TRAINER_ARGS...]
#
# Commands (several run in the order given, e.g. `copy setup run`):
#   create   create the slice: gcloud compute tpus tpu-vm create (a Spot VM with --spot)
#   copy     put the working tree (tracked and untracked, not ignored files) on every host as a
#            tarball over scp --worker=all; with GIT_URL set, clone GIT_REF on every host instead
#   setup    on every host: a Python PYTHON_VERSION virtualenv REMOTE_DIR/.venv (made with uv,
#            since TPU VM images ship an older Python) and pip install -e '.[tpu]'
#   run      on every host, in the background: aasp-pretrain --config=CONFIG --workdir=WORKDIR
#            --distributed=on TRAINER_ARGS..., output to REMOTE_DIR/runs/RUN_NAME.log; with
#            DATA_BUCKET, first mount that bucket read-only at /gcs/DATA_BUCKET on every host with
#            Cloud Storage FUSE (gcsfuse, installed from Google's apt repository if missing)
#   logs     follow worker 0's log
#   stop     stop the trainer started by `run` on every host
#   delete   delete the slice (gcloud asks for confirmation)
#   all      create copy setup run
#
# Each variable comes from the environment or from its flag (the flag wins):
#   TPU_NAME          --name=              slice name (required)
#   ZONE              --zone=              zone, e.g. us-east5-a (required)
#   PROJECT           --project=           GCP project (default: gcloud's configured project)
#   ACCELERATOR_TYPE  --accelerator-type=  slice type (default v5p-64: 32 chips, 8 hosts)
#   RUNTIME_VERSION   --version=           TPU software version (default from the generation: v6e
#                                          v2-alpha-tpuv6e, v5litepod v2-alpha-tpuv5-lite, v5p
#                                          v2-alpha-tpuv5, v4 tpu-ubuntu2204-base)
#   SPOT              --spot               1: a Spot slice, cheaper and preemptible (default 0)
#   BUCKET            --bucket=            GCS bucket, no gs:// (required by run without WORKDIR)
#   DATA_BUCKET       --data-bucket=       bucket of the training data, no gs://; `run` mounts it
#                                          at /gcs/DATA_BUCKET on every host (default: unset)
#   RUN_NAME          --run-name=          names the workdir and the log (default TPU_NAME)
#   WORKDIR           --workdir=           checkpoints and logs (default gs://BUCKET/aasp/RUN_NAME);
#                                          every host must see it, so on a pod it is on GCS
#   CONFIG            --config=            config file[:arg] (default configs/pretrain_base.py)
#   REMOTE_DIR        --remote-dir=        repo directory on each host, relative to the home
#                                          directory unless absolute (default aasp-jax)
#   PYTHON_VERSION    --python-version=    Python of the virtualenv (default 3.12)
#   GIT_URL           --git-url=           copy clones this repository instead (default: unset)
#   GIT_REF           --git-ref=           branch, tag or commit to check out (default main)
#   DRY_RUN           --dry-run            1: print every command, one per line, run nothing
#
# TRAINER_ARGS after `--` go to aasp-pretrain unchanged, e.g.
#   -- --config.global_batch=512 --config.data.train='/gcs/DATA_BUCKET/shards/clips-*.array_record'
# The trainer reads data through the file system, so data paths name the mount (/gcs/...), never
# gs://; the workdir stays gs://BUCKET/... (checkpoints are written to GCS directly).
# After a preemption, run the same command again: the trainer resumes from the latest complete
# checkpoint in WORKDIR (a deleted Spot slice needs `all` again).
#
# Example:
#   launch/tpu_vm.sh all --name=aasp-v5p --zone=us-east5-a --bucket=my-bucket --spot --dry-run \
#       --data-bucket=my-data -- --config.data.train='/gcs/my-data/shards/clips-*.array_record'
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCH_DIR")
# shellcheck source=launch/common.sh
source "$LAUNCH_DIR/common.sh"

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-64}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
SPOT=${SPOT:-0}
BUCKET=${BUCKET:-}
DATA_BUCKET=${DATA_BUCKET:-}
RUN_NAME=${RUN_NAME:-}
WORKDIR=${WORKDIR:-}
CONFIG=${CONFIG:-configs/pretrain_base.py}
REMOTE_DIR=${REMOTE_DIR:-aasp-jax}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
GIT_URL=${GIT_URL:-}
GIT_REF=${GIT_REF:-main}
DRY_RUN=${DRY_RUN:-0}

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
    --name) TPU_NAME=$VALUE ;;
    --zone) ZONE=$VALUE ;;
    --project) PROJECT=$VALUE ;;
    --accelerator-type) ACCELERATOR_TYPE=$VALUE ;;
    --version) RUNTIME_VERSION=$VALUE ;;
    --bucket) BUCKET=$VALUE ;;
    --data-bucket) DATA_BUCKET=$VALUE ;;
    --run-name) RUN_NAME=$VALUE ;;
    --workdir) WORKDIR=$VALUE ;;
    --config) CONFIG=$VALUE ;;
    --remote-dir) REMOTE_DIR=$VALUE ;;
    --python-version) PYTHON_VERSION=$VALUE ;;
    --git-url) GIT_URL=$VALUE ;;
    --git-ref) GIT_REF=$VALUE ;;
    -*) die "unknown flag: $FLAG" ;;
    create | copy | setup | run | logs | stop | delete) COMMANDS+=("$FLAG") ;;
    all) COMMANDS+=(create copy setup run) ;;
    *) die "unknown command: $FLAG (create, copy, setup, run, logs, stop, delete or all)" ;;
  esac
done

# Everything is checked before the first command runs, so `all` cannot create a slice and then
# stop at a missing bucket.
((${#COMMANDS[@]})) || die 'no command given (create, copy, setup, run, logs, stop, delete or all)'
require "$TPU_NAME" '--name (TPU_NAME)'
require "$ZONE" '--zone (ZONE)'
RUN_NAME=${RUN_NAME:-$TPU_NAME}
case " ${COMMANDS[*]} " in
  *' run '*)
    if [[ -z "$WORKDIR" ]]; then
      require "$BUCKET" '--bucket (BUCKET) or --workdir (WORKDIR)'
      WORKDIR="gs://${BUCKET#gs://}/aasp/$RUN_NAME"
    fi
    ;;
esac
DATA_BUCKET=${DATA_BUCKET#gs://}
DATA_BUCKET=${DATA_BUCKET%%/*}
if [[ -n "$DATA_BUCKET" && ! "$DATA_BUCKET" =~ ^[a-z0-9][a-z0-9._-]*$ ]]; then
  die "--data-bucket (DATA_BUCKET) must be a bucket name, got '$DATA_BUCKET'"
fi
if [[ -z "$RUNTIME_VERSION" ]]; then
  case "$ACCELERATOR_TYPE" in
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    *) RUNTIME_VERSION='' ;;
  esac
fi

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || WHERE+=(--project="$PROJECT")
# Remote commands start in the home directory; REMOTE_DIR is quoted once here for all of them.
RDIR=$(quote "$REMOTE_DIR")
LOG=$(quote "runs/$RUN_NAME.log")
PIDFILE=$(quote "runs/$RUN_NAME.pid")

# on_hosts WORKER COMMAND: run a shell command on the slice's hosts (all, or one index).
on_hosts() {
  run "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker="$1" --command "$2"
}

do_create() {
  require "$RUNTIME_VERSION" "--version (RUNTIME_VERSION) for ACCELERATOR_TYPE=$ACCELERATOR_TYPE"
  local spot=()
  [[ "$SPOT" != 1 ]] || spot=(--spot)
  run "${TPU[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" ${spot[@]+"${spot[@]}"}
}

do_copy() {
  if [[ -n "$GIT_URL" ]]; then
    # fetch + FETCH_HEAD takes a branch, a tag or a commit alike, and also updates an old clone.
    on_hosts all "{ [ -d $RDIR/.git ] || git clone --quiet $(quote "$GIT_URL") $RDIR; } \
&& git -C $RDIR fetch --quiet origin $(quote "$GIT_REF") \
&& git -C $RDIR checkout --quiet --detach FETCH_HEAD"
    return
  fi
  # One tarball instead of scp --recurse: one transfer per host, and no .git, .venv or caches.
  local tarball="${TMPDIR:-/tmp}/aasp-jax-$RUN_NAME.tar.gz"
  run bash -c "git -C $(quote "$REPO_ROOT") ls-files -z --cached --others --exclude-standard \
| tar -czf $(quote "$tarball") -C $(quote "$REPO_ROOT") --null -T -"
  run "${TPU[@]}" scp "$tarball" "$TPU_NAME:aasp-jax-src.tar.gz" "${WHERE[@]}" --worker=all
  on_hosts all "mkdir -p $RDIR && tar -xzf aasp-jax-src.tar.gz -C $RDIR && rm aasp-jax-src.tar.gz"
}

do_setup() {
  on_hosts all "cd $RDIR && python3 -m pip install --user --quiet --upgrade uv \
&& python3 -m uv venv --allow-existing --python $(quote "$PYTHON_VERSION") .venv \
&& python3 -m uv pip install --python .venv/bin/python -e '.[tpu]'"
}

# mount_data: a remote command that mounts DATA_BUCKET read-only at /gcs/DATA_BUCKET unless it is
# mounted already, installing gcsfuse first where it is missing (TPU VM images are Ubuntu).
mount_data() {
  local dir bucket keyring=/usr/share/keyrings/cloud.google.asc
  dir=$(quote "/gcs/$DATA_BUCKET")
  bucket=$(quote "$DATA_BUCKET")
  printf '%s' "{ mountpoint -q $dir || { { command -v gcsfuse > /dev/null || { \
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee $keyring > /dev/null \
&& echo \"deb [signed-by=$keyring] https://packages.cloud.google.com/apt \
gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null \
&& sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; }; } \
&& sudo mkdir -p $dir && sudo chown \$(id -u):\$(id -g) $dir \
&& gcsfuse -o ro --implicit-dirs $bucket $dir; }; }"
}

do_run() {
  local trainer mount=''
  # `on`, not `auto`: every TPU VM, one host or many, is a cluster that jax.distributed detects
  # from the metadata server, while a gcloud ssh session may lack the environment variables that
  # the trainer's `auto` looks at.
  trainer=$(quote .venv/bin/aasp-pretrain --config="$CONFIG" --workdir="$WORKDIR" \
    --distributed=on ${TRAINER_ARGS[@]+"${TRAINER_ARGS[@]}"})
  # nohup with every stream redirected lets ssh return while training goes on; $! is the trainer
  # itself (the braces keep `&` from backgrounding the whole && list), which `stop` kills.
  [[ -z "$DATA_BUCKET" ]] || mount="$(mount_data) && "
  on_hosts all "${mount}cd $RDIR && mkdir -p runs && { nohup $trainer > $LOG 2>&1 < /dev/null & \
echo \$! > $PIDFILE; }"
}

do_logs() {
  on_hosts 0 "cd $RDIR && tail -n 200 -F $LOG"
}

do_stop() {
  on_hosts all "cd $RDIR && if [ -f $PIDFILE ]; then kill \$(cat $PIDFILE) || true; fi"
}

do_delete() {
  run "${TPU[@]}" delete "$TPU_NAME" "${WHERE[@]}"
}

for command in "${COMMANDS[@]}"; do
  "do_$command"
done
