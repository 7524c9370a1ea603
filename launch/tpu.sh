#!/usr/bin/env bash
# Cloud TPU: create a slice, set up every worker, run a config on all workers, collect logs, delete.
#
# Usage: launch/tpu.sh COMMAND [--setting=value ...] [--dry-run] [-- extra par_jax.main flags]
#
# Commands:
#   create  create the slice: a TPU VM, or with --queued a queued resource (waits until ACTIVE); --spot for spot
#   setup   copy this checkout's git HEAD to every worker and install it with jax[tpu] in a Python 3.11+ venv
#   run     start `python -m par_jax.main` (in that venv) on all workers in the background, workdir on a bucket
#   logs    copy each worker's log of a run to logs/RUN_NAME/WORKER.log
#   stop    stop a run on all workers
#   delete  delete the slice (and its queued resource with --queued)
#
# Settings: a flag, or the environment variable named beside it.
#   --project=PROJECT_ID            Google Cloud project                              every command
#   --zone=ZONE                     e.g. us-east5-a                                   every command
#   --tpu=TPU_NAME                  name of the slice (and of its queued resource)    every command
#   --accelerator=ACCELERATOR_TYPE  e.g. v5p-64, v4-32, v6e-16                        create
#   --runtime-version=RUNTIME_VERSION  TPU VM image; default follows the accelerator  create
#   --spot (SPOT=1)                 spot capacity (preemptible, much cheaper)         create
#   --queued (QUEUED=1)             go through a queued resource                      create, delete
#   --jax-version=JAX_VERSION       pin jax[tpu]==VERSION (default: newest)           setup
#   --python=PYTHON_VERSION         the venv's Python (default 3.11; TPU images ship 3.10, too old for JAX)  setup
#   --config=CONFIG                 e.g. configs/par.py:size=XL,n=4,res=384           run
#   --name=RUN_NAME                 run name: workdir, log and pid file names         run, logs, stop
#   --bucket=BUCKET                 workdir gs://BUCKET/runs/RUN_NAME ...             run
#   --workdir=WORKDIR               ... unless given outright (must be gs://)         run
#   --dry-run (DRY_RUN=1)           print every command instead of running it
#
# Example (PAR-XL on a v5p-64, spot, through a queued resource):
#   export PROJECT_ID=my-project ZONE=us-east5-a TPU_NAME=par-xl ACCELERATOR_TYPE=v5p-64 BUCKET=my-bucket
#   launch/tpu.sh create --spot --queued && launch/tpu.sh setup
#   launch/tpu.sh run --config=configs/par.py:size=XL,n=4,res=384 --name=par_xl_4x
#   launch/tpu.sh logs --name=par_xl_4x; launch/tpu.sh delete --queued
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

COMMAND="${1:-}"
[[ -n "$COMMAND" ]] || { usage >&2; die "no command given: choose create, setup, run, logs, stop or delete."; }
[[ "$COMMAND" == -h || "$COMMAND" == --help ]] && { usage; exit 0; }
shift
EXTRA=()
while (($#)); do
  case "$1" in
    --project=*) PROJECT_ID="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --tpu=*) TPU_NAME="${1#*=}" ;;
    --accelerator=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --runtime-version=*) RUNTIME_VERSION="${1#*=}" ;;
    --jax-version=*) JAX_VERSION="${1#*=}" ;;
    --python=*) PYTHON_VERSION="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --name=*) RUN_NAME="${1#*=}" ;;
    --bucket=*) BUCKET="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (settings are --name=value; extra par_jax.main flags go after --)." ;;
  esac
  shift
done

require PROJECT_ID --project
require ZONE --zone
require TPU_NAME --tpu
WHERE=(--zone="$ZONE" --project="$PROJECT_ID")
# shellcheck disable=SC2016  # expanded on each worker
RUNS_DIR='$HOME/par_jax_runs' VENV='$HOME/par_jax_env'

# The TPU VM image that goes with each TPU generation (Cloud TPU docs, "TPU software versions").
default_runtime_version() {
  case "$1" in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default TPU VM image for accelerator '$1': pass --runtime-version=VERSION or export RUNTIME_VERSION." ;;
  esac
}

wait_until_active() {
  local describe=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${WHERE[@]}" --format='value(state.state)')
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "# then poll until the state is ACTIVE:"
    print_command "${describe[@]}"
    return
  fi
  local state
  while state="$("${describe[@]}")" && [[ "$state" != ACTIVE ]]; do
    case "$state" in
      FAILED | SUSPENDED) die "queued resource $TPU_NAME is $state; see: ${describe[*]::5} ${WHERE[*]}" ;;
    esac
    echo "queued resource $TPU_NAME: $state; checking again in 60 s" >&2
    sleep 60
  done
}

create() {
  require ACCELERATOR_TYPE --accelerator
  local version="${RUNTIME_VERSION:-}"
  [[ -n "$version" ]] || version="$(default_runtime_version "$ACCELERATOR_TYPE")"  # stops here if it has none
  local capacity=()
  [[ "${SPOT:-0}" == 1 ]] && capacity=(--spot)
  if [[ "${QUEUED:-0}" == 1 ]]; then
    run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$version" "${capacity[@]}" "${WHERE[@]}"
    wait_until_active
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$version" "${capacity[@]}" "${WHERE[@]}"
  fi
}

# Every worker gets the same code (this checkout's committed HEAD) and the same packages, in a venv made by uv
# (which also fetches the Python: the TPU VM images' python3 is 3.10, and JAX needs 3.11 or newer).
setup() {
  local repo tarball jax="jax[tpu]"
  repo="$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"
  tarball="${TMPDIR:-/tmp}/par_jax-$TPU_NAME.tar.gz"
  [[ -n "${JAX_VERSION:-}" ]] && jax="jax[tpu]==$JAX_VERSION"
  echo "# code: commit $(git -C "$repo" rev-parse --short HEAD) (uncommitted changes are not copied)" >&2
  run git -C "$repo" archive --format=tar.gz --prefix=par_jax/ -o "$tarball" HEAD
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:par_jax.tar.gz" --worker=all "${WHERE[@]}"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${WHERE[@]}" --command="set -e; \
rm -rf ~/par_jax $VENV; tar xzf ~/par_jax.tar.gz -C ~; python3 -m pip install -q --user uv; \
~/.local/bin/uv venv -q --python=${PYTHON_VERSION:-3.11} $VENV; \
~/.local/bin/uv pip install -q --python=$VENV/bin/python -e ~/par_jax \"$jax\""
}

# Starts the same command on every worker; jax.distributed finds the other workers by itself on Cloud TPU.
run_config() {
  require CONFIG --config
  require RUN_NAME --name
  if [[ -z "${WORKDIR:-}" ]]; then
    require BUCKET --bucket
    WORKDIR="gs://${BUCKET#gs://}/runs/$RUN_NAME"
  fi
  [[ "$WORKDIR" == gs://* ]] || die "WORKDIR '$WORKDIR' is not on a bucket: every worker must see the same workdir (gs://...)."
  local main
  main="$VENV/bin/python $(print_command -m par_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}")"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${WHERE[@]}" --command="cd ~/par_jax && mkdir -p $RUNS_DIR || exit 1; \
nohup $main > $RUNS_DIR/$RUN_NAME.log 2>&1 < /dev/null & echo \$! > $RUNS_DIR/$RUN_NAME.pid"
  echo "# started $RUN_NAME on every worker; workdir $WORKDIR; collect logs with: $0 logs --name=$RUN_NAME" >&2
}

logs() {
  require RUN_NAME --name
  local out="logs/$RUN_NAME"
  run mkdir -p "$out"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${WHERE[@]}" \
    --command="cat $RUNS_DIR/$RUN_NAME.log" --output-directory="$out"
  echo "# one file per worker: $out/WORKER.log" >&2
}

stop() {
  require RUN_NAME --name
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${WHERE[@]}" \
    --command="kill \$(cat $RUNS_DIR/$RUN_NAME.pid) || echo not running"
}

delete() {
  if [[ "${QUEUED:-0}" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$TPU_NAME" --force --quiet "${WHERE[@]}"
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --quiet "${WHERE[@]}"
  fi
}

case "$COMMAND" in
  create) create ;;
  setup) setup ;;
  run) run_config ;;
  logs) logs ;;
  stop) stop ;;
  delete) delete ;;
  *) die "unknown command '$COMMAND': choose create, setup, run, logs, stop or delete." ;;
esac
