#!/usr/bin/env bash
# Shared settings for the TPU VM scripts. Override any of them in the environment.
set -euo pipefail
: "${TPU_NAME:=zipchat}"
: "${ZONE:=us-central2-b}"
: "${ACCELERATOR:=v4-8}"
: "${RUNTIME:=tpu-ubuntu2204-base}"
: "${REPO_DIR:=zipchat}"

if [[ -z "${PROJECT:-}" ]]; then
  PROJECT=$(gcloud config get-value project 2>/dev/null || true)
fi
if [[ -z "${PROJECT}" ]]; then
  echo "error: set PROJECT or run 'gcloud config set project ...'" >&2
  exit 2
fi

# Runs a command on every worker of the TPU VM (a pod slice has several hosts).
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" \
    --worker=all --command "$1"
}
