#!/usr/bin/env bash
# Creates a TPU VM (single host or pod slice): TPU_NAME, ZONE, ACCELERATOR (e.g. v4-8, v5p-64).
source "$(dirname "$0")/common.sh"
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" \
  --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
