#!/usr/bin/env bash
# Training on a Cloud TPU VM pod slice: over `gcloud compute tpus tpu-vm ssh --worker=all`, every worker updates its
# clone of this repository, installs jax[tpu] and runs the trainer with --multihost; jax.distributed.initialize()
# finds its peers from the TPU metadata.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a WORKDIR=gs://my-bucket/blip2/stage1 \
#     bash launch/tpu_pod.sh --config=configs/stage1.py --config.tokenizer=/data/bert-base-uncased ...
#
# The arguments are the trainer's flags; --dry_run among them prints the gcloud command line (and the script each
# worker runs) and runs nothing.
# Environment: TPU_NAME, ZONE and WORKDIR (required); PROJECT (default: gcloud's); REPO_URL (default: this checkout's
# origin) and BRANCH (default main), what the workers check out.
# Each worker reads only its own share of the global batch (config.global_batch_size / number of hosts), so the
# TFDS data_dir must be readable from every worker (a GCS bucket or a copy on each VM). Each worker's output is also
# appended to ~/blip2_train.log on it.
set -euo pipefail

quote() { # quote WORD...: prints the words as one shell command line, quoting those that need it
  local word safe='^[A-Za-z0-9_./:=,@%+-]+$' out=()
  for word in "$@"; do
    if [[ $word =~ $safe ]]; then out+=("$word"); else out+=("'${word//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

dry_run=0
args=()
for arg in "$@"; do
  if [[ $arg == --dry_run ]]; then dry_run=1; else args+=("$arg"); fi
done
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
REPO_URL=${REPO_URL:-$(git config --get remote.origin.url || true)}
: "${REPO_URL:?set REPO_URL (this checkout has no origin remote)}"
BRANCH=${BRANCH:-main}

train=(python -m blip2_jax.train --multihost "--workdir=$WORKDIR" ${args[@]+"${args[@]}"})
remote="set -eo pipefail
if [ ! -d blip2_jax ]; then git clone --branch $(printf %q "$BRANCH") $(printf %q "$REPO_URL") blip2_jax; fi
cd blip2_jax && git fetch -q origin && git checkout -q $(printf %q "$BRANCH") && git pull -q
pip install -q -U \"jax[tpu]\" -e .
$(printf '%q ' "${train[@]}")2>&1 | tee -a \"\$HOME/blip2_train.log\""

cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE")
if [[ -n ${PROJECT:-} ]]; then cmd+=("--project=$PROJECT"); fi
cmd+=(--worker=all "--command=$remote")

if ((dry_run)); then
  quote "${cmd[@]}"
  exit 0
fi
exec "${cmd[@]}"
