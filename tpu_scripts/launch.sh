#!/usr/bin/env bash
# Launches one experiment on all workers of the TPU VM at once, with the same flags everywhere
# (multi-host: every worker runs the same program; jax.distributed.initialize() in
# tpu_scripts/run_distributed.py connects them, so any experiment works, not only those with a
# --distributed flag). Output goes to ~/EXPERIMENT.log on each worker; FOREGROUND=1 waits instead
# and streams every worker's output here (gcloud prefixes it per worker).
# Usage: tpu_scripts/launch.sh pretrain --preset=d20 --mesh=fsdp:-1 --out_dir=gs://bucket/run1
source "$(dirname "$0")/common.sh"
if [[ $# -lt 1 || $1 == -* ]]; then
  echo "usage: $0 EXPERIMENT [--flag=value ...]" >&2
  exit 2
fi
exp=$1; shift
root=$(cd "$(dirname "$0")/.." && pwd)
if [[ ! -f "$root/experiments/$exp.py" ]]; then
  echo "error: no experiment '$exp' (experiments/$exp.py does not exist)" >&2
  exit 2
fi
# Quoted once here, so a flag value with spaces or quotes arrives intact on every worker.
args=$(printf ' %q' "$@")
run="cd ~/$REPO_DIR && python3 tpu_scripts/run_distributed.py $exp$args"
if [[ "${FOREGROUND:-0}" == 1 ]]; then
  on_all_workers "$run"
else
  on_all_workers "$run > ~/$exp.log 2>&1 < /dev/null &"
  echo "launched experiments.$exp on all workers of $TPU_NAME; logs in ~/$exp.log on each worker"
fi
