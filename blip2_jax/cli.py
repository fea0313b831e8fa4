"""Command-line plumbing shared by train, evaluate and benchmark."""
import sys

from absl import flags


def parse_flags(argv):
  """absl flag parsing where a bad --config override is one line, not a traceback.

  ml_collections raises KeyError (with a "did you mean" hint) for a misspelt --config.a.b key and
  AttributeError/TypeError/ValueError for values of the wrong type; absl would print a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}\nPass --helpshort for the flags.")
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    msg = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    sys.exit(f"error: bad --config override: {' '.join(msg.split())}")
