#!/usr/bin/env bash
# Stage 1 on one GPU node (all local GPUs in one process; the mesh fills the 'data' axis with them):
#
#   WORKDIR=/checkpoints/blip2_stage1 bash launch/gpu_node.sh --config=configs/stage1.py \
#       --config.init.vision_weights=/ckpt/blip2-itm-vit-g --config.init.bert_weights=/ckpt/bert-base-uncased \
#       --config.tokenizer=/ckpt/bert-base-uncased --config.data.data_dir=/data/tfds
#
# Several nodes: start the same command on each under SLURM (srun) with --multihost added; JAX reads the
# coordinator and process ids from SLURM's environment.
set -euo pipefail
: "${WORKDIR:?set WORKDIR}"
pip install -q -U 'jax[cuda12]' -e .
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec python -m blip2_jax.train --workdir="$WORKDIR" "$@"
