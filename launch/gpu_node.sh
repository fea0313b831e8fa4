#!/usr/bin/env bash
# Training on one GPU node without a scheduler: installs jax[cuda12] and this package, then runs the trainer in one
# process that drives all local GPUs (the mesh fills its 'data' axis with them). Run from the repository root:
#
#   WORKDIR=/checkpoints/blip2_stage1 bash launch/gpu_node.sh --config=configs/stage1.py \
#       --config.init.vision_weights=/ckpt/blip2-itm-vit-g --config.init.bert_weights=/ckpt/bert-base-uncased \
#       --config.tokenizer=/ckpt/bert-base-uncased --config.data.data_dir=/data/tfds
#
# The arguments are the trainer's flags; --dry_run among them prints the commands and runs nothing.
# Environment: WORKDIR (required); XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.92).
# Several nodes under SLURM: launch/slurm.sh.
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
: "${WORKDIR:?set WORKDIR}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

install=(pip install -q -U 'jax[cuda12]' -e .)
train=(python -m blip2_jax.train "--workdir=$WORKDIR" ${args[@]+"${args[@]}"})
if ((dry_run)); then
  quote "${install[@]}"
  quote env "XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION" "${train[@]}"
  exit 0
fi
"${install[@]}"
exec "${train[@]}"
