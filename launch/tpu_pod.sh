#!/usr/bin/env bash
# Stage-1 pre-training on a Cloud TPU VM pod slice: every worker runs the same program; JAX finds its peers.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a WORKDIR=gs://my-bucket/blip2/stage1 \
#     bash launch/tpu_pod.sh --config=configs/stage1.py --config.tokenizer=/data/bert-base-uncased ...
#
# Each worker reads only its own share of the global batch (config.global_batch_size / number of hosts), so
# the TFDS data_dir must be readable from every worker (a GCS bucket or a copy on each VM).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
REPO_URL=${REPO_URL:-$(git config --get remote.origin.url || true)}
BRANCH=${BRANCH:-main}
ARGS=$(printf ' %q' "$@")

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
set -e
if [ ! -d blip2_jax ]; then git clone --branch $BRANCH $REPO_URL blip2_jax; fi
cd blip2_jax && git fetch -q && git checkout -q $BRANCH && git pull -q
pip install -q -U 'jax[tpu]' -e .
python -m blip2_jax.train --multihost --workdir=$WORKDIR $ARGS 2>&1 | tee -a \$HOME/blip2_train.log
"
