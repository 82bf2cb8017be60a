#!/usr/bin/env bash
# Launches one experiment on all workers at once (multi-host: every process runs the same
# program and jax.distributed.initialize() connects them).
# Usage: tpu_scripts/launch.sh pretrain --preset=d20 --mesh=fsdp:-1 --out_dir=gs://bucket/run1
source "$(dirname "$0")/common.sh"
if [[ $# -lt 1 ]]; then
  echo "usage: $0 EXPERIMENT [--flag=value ...]" >&2
  exit 2
fi
exp=$1; shift
args=$(printf ' %q' "$@")
on_all_workers "cd ~/$REPO_DIR && nohup python3 -m experiments.$exp --distributed$args \
  > ~/$exp.log 2>&1 &"
echo "launched experiments.$exp on all workers of $TPU_NAME; logs in ~/$exp.log on each worker"
