#!/usr/bin/env bash
# Copies this checkout to every worker and installs it with JAX for TPU.
source "$(dirname "$0")/common.sh"
root=$(cd "$(dirname "$0")/.." && pwd)
tarball=$(mktemp /tmp/zipchat.XXXXXX.tar.gz)
git -C "$root" archive --format=tar.gz -o "$tarball" HEAD
gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:~/zipchat.tar.gz" --zone "$ZONE" \
  --project "$PROJECT" --worker=all
rm -f "$tarball"
on_all_workers "rm -rf ~/$REPO_DIR && mkdir -p ~/$REPO_DIR && tar -xzf ~/zipchat.tar.gz -C ~/$REPO_DIR && \
  python3 -m pip install -U pip && python3 -m pip install 'jax[tpu]' && python3 -m pip install -e ~/$REPO_DIR"
