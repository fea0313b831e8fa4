"""Command-line plumbing shared by train, evaluate and benchmark."""

import os
import sys

from absl import flags
import jax
from ml_collections.config_flags import config_flags


def initialize_distributed():
  """jax.distributed.initialize() for a multi-process run: on TPU pods, SLURM, Open MPI and Kubernetes JAX finds
  the coordinator itself; elsewhere (e.g. several processes on one machine, launch/local.sh) the environment
  gives it: JAX_COORDINATOR_ADDRESS (host:port, read by JAX), JAX_NUM_PROCESSES and JAX_PROCESS_ID."""
  count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
  if (count is None) != (index is None):
    sys.exit("error: set both JAX_NUM_PROCESSES and JAX_PROCESS_ID (or neither, where JAX finds them itself).")
  if count is None:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(num_processes=int(count), process_id=int(index))


def parse_flags(argv):
  """absl flag parsing where bad input is one line, not a traceback:
  - a --config file that does not exist, or a variant its get_config refuses;
  - a misspelt --config.a.b key (ml_collections raises KeyError with a "did you mean" hint) or a value of the
    wrong type (AttributeError/TypeError/ValueError)."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    message = _config_file_error(str(e))
    sys.exit(f"error: {message}" + ("" if message != str(e) else "\nPass --helpshort for the flags."))
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    msg = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    sys.exit(f"error: bad --config override: {' '.join(msg.split())}")
  _check_config_files()
  return rest


def _config_file_error(message: str) -> str:
  """ml_collections wraps get_config's exception, traceback and all, into the flag error: keep its last line."""
  head, sep, tail = message.partition(": Error whilst parsing config file:")
  if not sep:
    return message
  lines = [line.strip() for line in tail.strip().splitlines() if line.strip()]
  last = lines[-1] if lines else tail.strip()
  return f"{head.removeprefix('flag ')}: {last.split(': ', 1)[-1]}"


def _check_config_files():
  """A --config file that cannot be read fails only when the config is first used (ml_collections loads it
  lazily): check each now, so the error is one sentence before anything else starts."""
  for name, flag in flags.FLAGS.__flags.items():  # pylint: disable=protected-access
    if not isinstance(flag, config_flags._ConfigFlag) or not flag.present:  # pylint: disable=protected-access
      continue
    path = flag.config_filename.split(":", 1)[0]
    if not os.path.isfile(path):
      configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
      known = (
        ", ".join(sorted(f"configs/{f}" for f in os.listdir(configs) if f.endswith(".py")))
        if os.path.isdir(configs)
        else ""
      )
      sys.exit(
        f"error: --{name}={flag.config_filename}: no config file {path!r} here ({os.getcwd()})."
        + (f" The configs are {known}." if known else "")
      )
    try:
      getattr(flags.FLAGS, name)
    except OSError as e:
      sys.exit(f"error: --{name}={flag.config_filename}: {' '.join(str(e).split())}")
