#!/usr/bin/env bash
# Training on GPU nodes under SLURM: srun starts the trainer with --multihost on every node, one process per node
# (driving all its GPUs) or one per GPU, and jax.distributed.initialize() takes the coordinator, process count and
# process id from SLURM's environment. Outside an allocation this submits an sbatch job that runs the srun; inside one
# (salloc, or an sbatch script: SLURM_JOB_ID is set) it runs the srun directly. Run from the repository root, with
# blip2_jax and jax[cuda12] installed in the Python environment every node sees (sbatch and srun pass on this one):
#
#   WORKDIR=/ckpt/blip2_stage1 bash launch/slurm.sh --nodes=2 --gpus_per_node=8 -- \
#     --config=configs/stage1.py --config.init.vision_weights=/ckpt/blip2-itm-vit-g ...
#
# Options (before the --; after it come the trainer's flags):
#   --nodes=N           nodes (default 1)
#   --gpus_per_node=G   GPUs per node (default 8)
#   --per=node|gpu      one process per node that sees its G GPUs (default), or G processes per node, one per GPU
#   --partition=P --account=A --time=T --job_name=NAME   passed to sbatch (job_name default blip2_jax)
#   --dry_run           print the command line and run nothing
# Environment: WORKDIR (required); XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.92).
# --kill-on-bad-exit=1 ends every process when one fails. JAX takes the coordinator port from the job id; set
# JAX_COORDINATOR_PORT to choose it.
set -euo pipefail

quote() { # quote WORD...: prints the words as one shell command line, quoting those that need it
  local word safe='^[A-Za-z0-9_./:=,@%+-]+$' out=()
  for word in "$@"; do
    if [[ $word =~ $safe ]]; then out+=("$word"); else out+=("'${word//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p;}' "$0"; }
die() {
  echo "slurm.sh: $*" >&2
  exit 2
}

nodes=1
gpus=8
per=node
dry_run=0
sbatch_opts=()
while (($#)); do
  case $1 in
    --nodes=*) nodes=${1#*=} ;;
    --gpus_per_node=*) gpus=${1#*=} ;;
    --per=*) per=${1#*=} ;;
    --partition=* | --account=* | --time=*) sbatch_opts+=("$1") ;;
    --job_name=*) sbatch_opts+=("--job-name=${1#*=}") ;;
    --dry_run) dry_run=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      break
      ;;
    *) die "unknown option '$1' (the trainer's flags come after --; --help lists the options)" ;;
  esac
  shift
done
: "${WORKDIR:?set WORKDIR}"
for value in "$nodes" "$gpus"; do
  [[ $value =~ ^[1-9][0-9]*$ ]] || die "--nodes and --gpus_per_node take positive integers"
done

environment=("XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}")
case $per in
  node)
    tasks_per_node=1
    # JAX's SLURM detection would give each process only the GPU numbered SLURM_LOCALID (0): give it all of them.
    device_ids=$(seq -s, 0 $((gpus - 1)))
    environment+=("JAX_LOCAL_DEVICE_IDS=$device_ids")
    ;;
  gpu)
    # Each process drives the GPU numbered SLURM_LOCALID; every task sees all the node's GPUs (no --gpus-per-task).
    tasks_per_node=$gpus
    ;;
  *) die "--per takes node or gpu" ;;
esac

train=(python -m blip2_jax.train --multihost "--workdir=$WORKDIR" "$@")
srun=(srun "--nodes=$nodes" "--ntasks-per-node=$tasks_per_node" --kill-on-bad-exit=1 "${train[@]}")
if [[ -n ${SLURM_JOB_ID:-} ]]; then
  cmd=(env "${environment[@]}" "${srun[@]}")
else
  if [[ ! " ${sbatch_opts[*]} " =~ " --job-name=" ]]; then sbatch_opts+=(--job-name=blip2_jax); fi
  cmd=(env "${environment[@]}" sbatch "--nodes=$nodes" "--ntasks-per-node=$tasks_per_node" "--gpus-per-node=$gpus"
    "${sbatch_opts[@]}" "--wrap=$(quote "${srun[@]}")")
fi

if ((dry_run)); then
  quote "${cmd[@]}"
  exit 0
fi
exec "${cmd[@]}"
