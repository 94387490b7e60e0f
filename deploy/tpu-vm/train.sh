#!/bin/bash
# chipwise on a multi-host Cloud TPU VM slice (e.g. v5litepod-16: 4 hosts x 4 chips): the same command runs on
# every worker, and JAX finds the other workers from the TPU VM's metadata (CHIPWISE_DISTRIBUTED=1 asks for
# jax.distributed.initialize() on every host).
#   TPU_NAME=my-slice ZONE=us-west4-a bash deploy/tpu-vm/train.sh --config configs/demo.yaml
# Run with SETUP=1 once to clone and install chipwise on every worker.
set -euo pipefail

TPU_NAME=${TPU_NAME:?set TPU_NAME to the TPU VM slice}
ZONE=${ZONE:?set ZONE to its zone}
REPO=${REPO:-https://github.com/your-org/chipwise.git}
DIR=${DIR:-chipwise}
SHARED=${SHARED:-/mnt/shared}   # a file system every worker mounts (Filestore NFS, or a gcsfuse bucket)
RUN_DIR=${RUN_DIR:-$SHARED/runs/chipwise-$(date +%Y%m%d-%H%M%S)}

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

if [[ "${SETUP:-0}" == 1 ]]; then
  on_all_workers "git clone $REPO $DIR 2>/dev/null || git -C $DIR pull; cd $DIR && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
fi

args=$(printf ' %q' --set "run_dir=$RUN_DIR" "$@")
on_all_workers "cd $DIR && CHIPWISE_DISTRIBUTED=1 CHIPWISE_CACHE=$SHARED/.cache/chipwise .venv/bin/chipwise train$args"
