#!/usr/bin/env bash
# SLURM, multi-node GPUs: submit one job that runs `python -m par_jax.main` as one process per GPU on every node.
#
# Usage: launch/slurm.sh [--setting=value ...] [--dry-run] [-- extra par_jax.main flags]
#
# Settings: a flag, or the environment variable named beside it.
#   --config=CONFIG                 e.g. configs/par.py:size=XL,n=4,res=384           required
#   --workdir=WORKDIR               shared by every node (a shared filesystem or gs://) required
#   --nodes=NODES                   number of nodes                                   required
#   --gpus-per-node=GPUS_PER_NODE   GPUs (and processes) per node                     required
#   --name=RUN_NAME                 job name and log file names (default: par_jax)
#   --partition=PARTITION           SLURM partition (default: the cluster's)
#   --account=ACCOUNT               SLURM account (default: the cluster's)
#   --time=TIME_LIMIT               wall-clock limit, e.g. 3-00:00:00 (default: the partition's)
#   --cpus-per-gpu=CPUS_PER_GPU     CPU cores per process for the input pipeline (default 8)
#   --setup=SETUP                   shell run first on every node, e.g. 'source ~/venv/bin/activate'
#   --log-dir=LOG_DIR               where the logs go (default: logs/ in this checkout)
#   --dry-run (DRY_RUN=1)           print the sbatch command instead of submitting it
#
# JAX finds its peers from SLURM's variables (jax.distributed.initialize() with no arguments, called by
# par_jax.main): process i of a node takes GPU SLURM_LOCALID, so every task sees all GPUs of its node.
# Logs: LOG_DIR/RUN_NAME-JOBID-TASK.log, one file per process.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

EXTRA=()
while (($#)); do
  case "$1" in
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --nodes=*) NODES="${1#*=}" ;;
    --gpus-per-node=*) GPUS_PER_NODE="${1#*=}" ;;
    --name=*) RUN_NAME="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --account=*) ACCOUNT="${1#*=}" ;;
    --time=*) TIME_LIMIT="${1#*=}" ;;
    --cpus-per-gpu=*) CPUS_PER_GPU="${1#*=}" ;;
    --setup=*) SETUP="${1#*=}" ;;
    --log-dir=*) LOG_DIR="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (settings are --name=value; extra par_jax.main flags go after --)." ;;
  esac
  shift
done

require CONFIG --config
require WORKDIR --workdir
require NODES --nodes
require GPUS_PER_NODE --gpus-per-node
for n in NODES GPUS_PER_NODE; do
  [[ "${!n}" =~ ^[1-9][0-9]*$ ]] || die "$n must be a positive integer, got '${!n}'."
done
RUN_NAME="${RUN_NAME:-par_jax}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG_DIR="${LOG_DIR:-$REPO/logs}"

options=(--job-name="$RUN_NAME" --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" --gpus-per-node="$GPUS_PER_NODE"
  --cpus-per-task="${CPUS_PER_GPU:-8}" --chdir="$REPO" --output="$LOG_DIR/$RUN_NAME-%j.out")
[[ -n "${PARTITION:-}" ]] && options+=(--partition="$PARTITION")
[[ -n "${ACCOUNT:-}" ]] && options+=(--account="$ACCOUNT")
[[ -n "${TIME_LIMIT:-}" ]] && options+=(--time="$TIME_LIMIT")

# One task per GPU; a task that fails ends the whole job instead of leaving the others waiting at a collective.
step="$(print_command srun --kill-on-bad-exit=1 --output="$LOG_DIR/$RUN_NAME-%j-%t.log" \
  python3 -m par_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}")"
[[ -n "${SETUP:-}" ]] && step="$SETUP && $step"

run mkdir -p "$LOG_DIR"  # sbatch needs it before the job starts
run sbatch "${options[@]}" --wrap="$step"
