#!/usr/bin/env bash
# Pre-train on GPU nodes under SLURM: write an sbatch script that starts aasp-pretrain with srun on
# every node, then submit it.
#
# Usage: launch/slurm_gpu.sh --workdir=DIR [--flag=VALUE...] [--per-node] [--explicit-coordinator]
#                            [--dry-run] [-- TRAINER_ARGS...]
#
# Process layout (jax.distributed joins the processes into one job either way):
#   per-gpu   (default) one process per GPU: srun --ntasks-per-node=GPUS_PER_NODE. jax's SLURM
#             detection gives process i the GPU SLURM_LOCALID, so every task must see all the
#             node's GPUs (no per-task GPU binding is requested).
#   per-node  (--per-node) one process per node driving all its GPUs: srun --ntasks-per-node=1,
#             with JAX_LOCAL_DEVICE_IDS=0,...,GPUS_PER_NODE-1, because jax's SLURM detection would
#             otherwise keep only GPU SLURM_LOCALID (= 0) in each process.
# Coordinator:
#   auto      (default) --distributed=auto: jax reads SLURM_STEP_NODELIST, SLURM_NTASKS,
#             SLURM_PROCID and SLURM_LOCALID and picks a port from the job id.
#   explicit  (--explicit-coordinator) the first host of `scontrol show hostnames
#             $SLURM_JOB_NODELIST` and PORT, passed as --coordinator_address with --num_processes
#             and --process_id from SLURM_NTASKS and SLURM_PROCID.
#
# Each variable comes from the environment or from its flag (the flag wins):
#   WORKDIR           --workdir=              checkpoints and logs, on a filesystem (or bucket) that
#                                             every node sees (required)
#   CONFIG            --config=               config file[:arg] (default configs/pretrain_base.py)
#   NODES             --nodes=                nodes (default 1)
#   GPUS_PER_NODE     --gpus-per-node=        GPUs per node (default 8)
#   CPUS_PER_GPU      --cpus-per-gpu=         CPU cores per GPU, for the input pipeline (default 12)
#   PARTITION         --partition=            partition (default: the cluster's default)
#   ACCOUNT           --account=              account to charge (default: the user's default)
#   TIME_LIMIT        --time=                 wall-clock limit (default 24:00:00)
#   JOB_NAME          --job-name=             job name (default aasp-pretrain)
#   MODE              --per-node              per-gpu or per-node (default per-gpu)
#   COORDINATOR       --explicit-coordinator  auto or explicit (default auto)
#   PORT              --port=                 coordinator port in explicit mode (default 12355)
#   VENV              --venv=                 virtualenv activated before srun (default: unset,
#                                             aasp-pretrain is already on PATH)
#   CONTAINER_IMAGE   --container-image=      run in this image through pyxis (srun
#                                             --container-image), the package installed in it
#                                             (default: unset)
#   CONTAINER_MOUNTS  --container-mounts=     extra pyxis mounts, e.g. /data:/data; REPO_DIR is
#                                             always mounted (default: unset)
#   REPO_DIR          --repo-dir=             checkout every node sees; the job starts there
#                                             (default: the checkout holding this script)
#   LOG_DIR           --log-dir=              where the sbatch script and the job log %x-%j.out go
#                                             (default REPO_DIR/runs/slurm)
#   DRY_RUN           --dry-run               1: print the commands (the sbatch script as a here
#                                             document, then sbatch), submit nothing
#
# TRAINER_ARGS after `--` go to aasp-pretrain unchanged, e.g.
#   -- --config.global_batch=96 --config.model.attention_impl=cudnn
# Each process reads global_batch / (number of processes) clips. After a preemption or a time
# limit, submit the same command again: the trainer resumes from the latest complete checkpoint.
#
# Example:
#   launch/slurm_gpu.sh --workdir=/ckpt/aasp_b16 --nodes=2 --partition=gpu --dry-run
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$LAUNCH_DIR/common.sh"

WORKDIR=${WORKDIR:-}
CONFIG=${CONFIG:-configs/pretrain_base.py}
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_GPU=${CPUS_PER_GPU:-12}
PARTITION=${PARTITION:-}
ACCOUNT=${ACCOUNT:-}
TIME_LIMIT=${TIME_LIMIT:-24:00:00}
JOB_NAME=${JOB_NAME:-aasp-pretrain}
MODE=${MODE:-per-gpu}
COORDINATOR=${COORDINATOR:-auto}
PORT=${PORT:-12355}
VENV=${VENV:-}
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-}
REPO_DIR=${REPO_DIR:-$(dirname "$LAUNCH_DIR")}
LOG_DIR=${LOG_DIR:-}
DRY_RUN=${DRY_RUN:-0}

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
    --per-node) MODE=per-node; continue ;;
    --explicit-coordinator) COORDINATOR=explicit; continue ;;
    -*) ((HAS_VALUE)) || die "$FLAG takes a value: $FLAG=VALUE" ;;
    *) die "unexpected argument: $FLAG (trainer arguments go after --)" ;;
  esac
  case "$FLAG" in
    --workdir) WORKDIR=$VALUE ;;
    --config) CONFIG=$VALUE ;;
    --nodes) NODES=$VALUE ;;
    --gpus-per-node) GPUS_PER_NODE=$VALUE ;;
    --cpus-per-gpu) CPUS_PER_GPU=$VALUE ;;
    --partition) PARTITION=$VALUE ;;
    --account) ACCOUNT=$VALUE ;;
    --time) TIME_LIMIT=$VALUE ;;
    --job-name) JOB_NAME=$VALUE ;;
    --port) PORT=$VALUE ;;
    --venv) VENV=$VALUE ;;
    --container-image) CONTAINER_IMAGE=$VALUE ;;
    --container-mounts) CONTAINER_MOUNTS=$VALUE ;;
    --repo-dir) REPO_DIR=$VALUE ;;
    --log-dir) LOG_DIR=$VALUE ;;
    *) die "unknown flag: $FLAG" ;;
  esac
done

require "$WORKDIR" '--workdir (WORKDIR)'
for pair in "--nodes:$NODES" "--gpus-per-node:$GPUS_PER_NODE" "--cpus-per-gpu:$CPUS_PER_GPU" \
  "--port:$PORT"; do
  name=${pair%%:*}
  value=${pair#*:}
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || die "$name must be a positive integer, not '$value'"
done
case "$MODE" in
  per-gpu) TASKS_PER_NODE=$GPUS_PER_NODE; CPUS_PER_TASK=$CPUS_PER_GPU ;;
  per-node) TASKS_PER_NODE=1; CPUS_PER_TASK=$((CPUS_PER_GPU * GPUS_PER_NODE)) ;;
  *) die "MODE must be per-gpu or per-node, not '$MODE'" ;;
esac
case "$COORDINATOR" in
  auto | explicit) ;;
  *) die "COORDINATOR must be auto or explicit, not '$COORDINATOR'" ;;
esac
LOG_DIR=${LOG_DIR:-$REPO_DIR/runs/slurm}
SCRIPT="$LOG_DIR/$JOB_NAME.sbatch"

# The srun line. Flags are repeated on srun because since SLURM 22.05 srun no longer inherits
# --cpus-per-task from sbatch, and being explicit keeps the layout visible in one place.
srun_cmd=(srun --nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK"
  --kill-on-bad-exit=1)
if [[ -n "$CONTAINER_IMAGE" ]]; then
  mounts="$REPO_DIR:$REPO_DIR${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
  srun_cmd+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts"
    --container-workdir="$REPO_DIR")
fi
trainer=(aasp-pretrain --config="$CONFIG" --workdir="$WORKDIR")
if [[ "$COORDINATOR" == auto ]]; then
  srun_line="$(quote "${srun_cmd[@]}" "${trainer[@]}" --distributed=auto \
    ${TRAINER_ARGS[@]+"${TRAINER_ARGS[@]}"})"
else
  # SLURM_PROCID differs per task, so the trainer's command line is expanded inside each task.
  task="exec $(quote "${trainer[@]}" ${TRAINER_ARGS[@]+"${TRAINER_ARGS[@]}"}) \
--coordinator_address=\"\$AASP_COORDINATOR\" --num_processes=\"\$SLURM_NTASKS\" \
--process_id=\"\$SLURM_PROCID\""
  srun_line="$(quote "${srun_cmd[@]}" bash -c "$task")"
fi

sbatch_script() {
  echo '#!/bin/bash'
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=$TASKS_PER_NODE"
  echo "#SBATCH --gpus-per-node=$GPUS_PER_NODE"
  echo "#SBATCH --cpus-per-task=$CPUS_PER_TASK"
  echo "#SBATCH --time=$TIME_LIMIT"
  echo "#SBATCH --output=$LOG_DIR/%x-%j.out"
  [[ -z "$PARTITION" ]] || echo "#SBATCH --partition=$PARTITION"
  [[ -z "$ACCOUNT" ]] || echo "#SBATCH --account=$ACCOUNT"
  echo '#SBATCH --exclusive'
  echo "# Written by launch/slurm_gpu.sh ($MODE processes, $COORDINATOR coordinator)."
  echo 'set -euo pipefail'
  echo "cd $(quote "$REPO_DIR")"
  [[ -z "$VENV" ]] || echo "source $(quote "$VENV/bin/activate")"
  if [[ "$MODE" == per-node ]]; then
    local ids
    ids=$(seq -s, 0 $((GPUS_PER_NODE - 1)))
    # shellcheck disable=SC2016  # the variable is for the job to read, not expanded here
    echo '# Without this, jax keeps only GPU $SLURM_LOCALID (0) when it detects SLURM.'
    echo "export JAX_LOCAL_DEVICE_IDS=$ids"
  fi
  if [[ "$COORDINATOR" == explicit ]]; then
    echo '# sed, not head: head exits early, and under pipefail the SIGPIPE that scontrol then gets'
    echo '# would end the job.'
    # shellcheck disable=SC2016  # expanded by the job on its first node, not here
    echo 'AASP_COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p):'"$PORT"'"'
    echo 'export AASP_COORDINATOR'
  fi
  echo "$srun_line"
}

run mkdir -p "$LOG_DIR"
if [[ "$DRY_RUN" == 1 ]]; then
  # Printed as a here document, so the dry run is itself a script that does what this one does.
  echo "cat > $(quote "$SCRIPT") <<'EOF'"
  sbatch_script
  echo 'EOF'
else
  sbatch_script > "$SCRIPT"
fi
run sbatch "$SCRIPT"
