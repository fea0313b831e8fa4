#!/usr/bin/env bash
# A multi-process JAX job on this machine: N processes of one command, each with D fake CPU devices, joined by a
# plain jax.distributed.initialize() (the trainer's --multihost). For trying the multi-host code paths without a pod:
#
#   bash launch/local.sh --processes=2 --devices_per_process=4 -- \
#     python -m blip2_jax.train --config=configs/stage1.py:tiny --workdir=/tmp/blip2_local --multihost
#
# Options (before the --):
#   --processes=N            processes to start (default 2)
#   --devices_per_process=D  fake CPU devices in each process (default 1)
#   --port=P                 the coordinator's port on 127.0.0.1 (default: a free one)
#   --log_dir=DIR            where process_<i>.log goes (default: a new directory under $TMPDIR or /tmp)
#   --grace_period=S         seconds from SIGTERM (or a forwarded SIGINT) to SIGKILL when stopping (default 120:
#                            a trainer saves a checkpoint on SIGTERM before it exits)
#   --dry_run                print each process's command line and run nothing
#
# Process i runs with JAX_PLATFORMS=cpu, XLA_FLAGS=... --xla_force_host_platform_device_count=D,
# JAX_COORDINATOR_ADDRESS=127.0.0.1:P (and the coordinator binds only there), JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i,
# and SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS=N, SLURM_PROCID=i and SLURM_LOCALID=i. A plain
# jax.distributed.initialize() takes the coordinator from JAX_COORDINATOR_ADDRESS and the process count and id from
# its SLURM detector (JAX itself reads no JAX_NUM_PROCESSES or JAX_PROCESS_ID; blip2_jax.cli passes them on).
# Each process's stdout and stderr go to DIR/process_<i>.log; process 0's output is also shown here. When a process
# fails, the others are stopped, its last log lines are shown and the launcher exits with its status. SIGINT and
# SIGTERM to the launcher are forwarded to every process (the trainer takes SIGTERM as a preemption notice: every
# process saves the same step and exits 0; SIGKILL follows after the grace period).
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
  echo "local.sh: $*" >&2
  exit 2
}

processes=2
devices=1
port=""
log_dir=""
grace=120
dry_run=0
while (($#)); do
  case $1 in
    --processes=*) processes=${1#*=} ;;
    --devices_per_process=*) devices=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --log_dir=*) log_dir=${1#*=} ;;
    --grace_period=*) grace=${1#*=} ;;
    --dry_run) dry_run=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      break
      ;;
    *) die "unknown option '$1' (the command to run comes after --; --help lists the options)" ;;
  esac
  shift
done
(($#)) || die "no command: bash launch/local.sh [OPTIONS] -- python -m blip2_jax.train ... --multihost"
for value in "$processes" "$devices" "$grace"; do
  [[ $value =~ ^[1-9][0-9]*$ ]] || die "--processes, --devices_per_process and --grace_period take positive integers"
done

python=$(command -v python3 || command -v python || true)
if [[ -z $port ]]; then
  [[ -n $python ]] || die "no python3 to find a free port; pass --port"
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
fi
[[ $port =~ ^[1-9][0-9]*$ ]] || die "--port takes a port number"

# This job's device count replaces any in the caller's XLA_FLAGS; the caller's other XLA flags are kept.
xla_flags=()
read -ra caller_flags <<<"${XLA_FLAGS:-}"
for flag in ${caller_flags[@]+"${caller_flags[@]}"}; do
  [[ $flag == --xla_force_host_platform_device_count=* ]] || xla_flags+=("$flag")
done
xla_flags+=("--xla_force_host_platform_device_count=$devices")

# gRPC would send the coordinator's traffic to a proxy, if one is set.
no_proxy_vars=()
if env | grep -qiE '^(https?|grpc|all)_proxy='; then
  no_proxy_vars=("no_proxy=127.0.0.1,localhost${no_proxy:+,$no_proxy}"
    "NO_PROXY=127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}")
fi

if ((dry_run)); then
  log_dir=${log_dir:-${TMPDIR:-/tmp}/blip2_local.XXXXXX}
else
  if [[ -z $log_dir ]]; then
    log_dir=$(mktemp -d "${TMPDIR:-/tmp}/blip2_local.XXXXXX")
  fi
  mkdir -p "$log_dir"
fi

command_of() { # command_of I: the command line of process I, in the array `cmd`
  # An Open MPI launcher's variable would win over the SLURM ones in JAX's cluster detection: drop it.
  cmd=(env -u OMPI_MCA_orte_hnp_uri
    JAX_PLATFORMS=cpu "XLA_FLAGS=${xla_flags[*]}" PYTHONUNBUFFERED=1
    "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_COORDINATOR_BIND_ADDRESS=127.0.0.1:$port"
    "JAX_NUM_PROCESSES=$processes" "JAX_PROCESS_ID=$1"
    "SLURM_JOB_ID=$port" SLURM_STEP_NODELIST=localhost "SLURM_NTASKS=$processes" "SLURM_PROCID=$1" "SLURM_LOCALID=$1"
    ${no_proxy_vars[@]+"${no_proxy_vars[@]}"} "${@:2}")
}

if ((dry_run)); then
  for ((i = 0; i < processes; i++)); do
    command_of "$i" "$@"
    echo "$(quote "${cmd[@]}") </dev/null >$(quote "$log_dir/process_$i.log") 2>&1 &"
  done
  exit 0
fi

pids=()    # pids[i]: process i's pid, also its process group; "" once it has been waited for
statuses=() # statuses[i]: its exit status, once known
failed=""   # the first process that failed
stopping=0

alive() { # alive I: whether process I's process group still has a member
  [[ -n ${pids[$1]} ]] && kill -0 -- "-${pids[$1]}" 2>/dev/null
}

reap() { # reap [all]: waits for the processes that have exited (for all of them, with "all"); records the first failure
  local i rc
  for i in "${!pids[@]}"; do
    if [[ -n ${pids[i]} ]] && { [[ ${1:-} == all ]] || ! kill -0 "${pids[i]}" 2>/dev/null; }; then
      rc=0
      wait "${pids[i]}" || rc=$?
      statuses[i]=$rc
      pids[i]=""
      if ((rc != 0 && !stopping)) && [[ -z $failed ]]; then
        failed=$i
      fi
    fi
  done
}

shown=0
show_output() { # prints what process 0 has written since the last call
  local size
  size=$(wc -c <"$log_dir/process_0.log")
  if ((size > shown)); then
    tail -c "+$((shown + 1))" "$log_dir/process_0.log" | head -c "$((size - shown))"
    shown=$((size))
  fi
}

stop() { # stop SIGNAL: sends SIGNAL to every process group still running, then SIGKILL after the grace period
  local i tick
  stopping=1
  for i in "${!pids[@]}"; do
    if [[ -n ${pids[i]} ]]; then kill -s "$1" -- "-${pids[i]}" 2>/dev/null || true; fi
  done
  for ((tick = 0; tick < grace * 10; tick++)); do
    reap
    local running=0
    for i in "${!pids[@]}"; do
      if alive "$i"; then running=1; fi
    done
    ((running)) || break
    sleep 0.1
  done
  for i in "${!pids[@]}"; do
    if alive "$i"; then
      say "process $i did not stop within ${grace}s of SIG$1: SIGKILL"
      kill -s KILL -- "-${pids[i]}" 2>/dev/null || true
    fi
  done
  reap all
}

on_signal() { # on_signal NAME NUMBER
  trap '' INT TERM HUP
  say "SIG$1: stopping all $processes processes"
  stop "$1"
  show_output
  exit $((128 + $2))
}

cleanup() { # on any exit: no process of this job outlives the launcher
  local i
  for i in "${!pids[@]}"; do
    if alive "$i"; then kill -s KILL -- "-${pids[i]}" 2>/dev/null || true; fi
  done
  reap all
}

trap cleanup EXIT
trap 'on_signal INT 2' INT
trap 'on_signal TERM 15' TERM
trap 'on_signal HUP 1' HUP

# This launcher's messages go to fd 3 (the caller's stderr); bash's own notes on the processes it stops ("Killed")
# go to launcher.log.
exec 3>&2 2>>"$log_dir/launcher.log"
say() { echo "local.sh: $*" >&3; }
say "$processes processes x $devices CPU devices, coordinator 127.0.0.1:$port, logs in $log_dir"
set -m # each process starts in its own process group, so that it is stopped with all its children
for ((i = 0; i < processes; i++)); do
  command_of "$i" "$@"
  : >"$log_dir/process_$i.log"
  "${cmd[@]}" </dev/null >"$log_dir/process_$i.log" 2>&1 3>&- &
  pids[i]=$!
done
set +m

while true; do
  reap
  show_output
  if [[ -n $failed ]]; then
    status=${statuses[failed]}
    say "process $failed exited with status $status: stopping the others"
    stop TERM
    show_output
    if ((failed != 0)); then
      say "the last lines of $log_dir/process_$failed.log:"
      tail -n 20 "$log_dir/process_$failed.log" | sed "s/^/[$failed] /" >&3
    fi
    exit "$status"
  fi
  running=0
  for i in "${!pids[@]}"; do
    if [[ -n ${pids[i]} ]]; then running=1; fi
  done
  ((running)) || break
  sleep 0.2
done
say "all $processes processes exited with status 0 (logs in $log_dir)"
