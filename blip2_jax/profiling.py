"""Where a compiled program's time goes, read from a JAX profiler trace alone (no TensorBoard, no browser).

  with jax.profiler.trace(log_dir):
    ...  # `calls` calls of the compiled program, then block_until_ready
  profile = profiling.summarize(log_dir, [compiled.as_text()], calls)
  print(profiling.format_table(profile))

`summarize` reads the newest trace under log_dir (jax.profiler.trace writes log_dir/plugins/profile/<date_time>/
<host>.xplane.pb), adds up each executed HLO op's time and calls, and sorts the ops into CATEGORIES by looking them
up in the compiled program's HLO text: the op's opcode, the opcodes of the computations it calls (a fusion's body)
and its metadata op_name (the JAX name stack, with the Flax module path):

- collective: all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute, their -start / -done forms
  and async ops that wrap one;
- attention: the attention core, q.k, softmax and weights.v (ops under the ATTENTION_SCOPE name scope, which the
  models put around it), and cuDNN's fused attention; the q, k, v and output projections are matmuls;
- matmul: dots and convolutions, fusions that hold one, cuBLAS GEMM calls;
- layer_norm: ops under the LAYER_NORM_SCOPE name scope (the models' LayerNorm and RMSNorm);
- copy: copies and transposes, and fusions that only move data (slices, pads, concatenations,
  dynamic-update-slices, broadcasts);
- other: the rest (elementwise fusions, reductions, the optimizer's update, ...).
An op missing from the HLO texts is sorted by its name ("all-reduce.3", "copy.2", "gemm", ...).

Which events are ops: on a device plane (GPU, TPU) its "XLA Ops" line, or where it has none its events that carry
an hlo_op stat (a GPU's kernels on their streams); without device planes (the CPU backend) the host's events that
carry an hlo_op stat (the thunks XLA:CPU runs, one event per op and call). Control flow (while, conditional, call)
is left out: its bodies' ops are counted one by one, and on the CPU the loop's own event spans theirs.

Times are op times summed over the devices read, then given per call of the program and per device. On a CPU, ops
that run at the same time on different threads each count in full, so an op's share is of the ops' summed time,
not of the wall-clock step; and an op that XLA:CPU runs asynchronously (an Eigen dot, "dot.N", when other work is
ready) has an event as long as its launch, its work running untraced on the thread pool: there the matmul share is a
lower bound (docs/benchmarks.md says by how much on the tiny stage-1 step). A GPU's or TPU's trace times each kernel
or op itself.
"""

import collections
import dataclasses
import glob
import json
import os
import re

import jax

# The name scopes (jax.named_scope) of the models' attention core and norms, found in the HLO metadata's op_name.
# Not "attention": the Q-Former's attention modules are named so, and their projections are matmuls.
ATTENTION_SCOPE = "dot_product_attention"
LAYER_NORM_SCOPE = "layer_norm"
CATEGORIES = ("attention", "matmul", "layer_norm", "collective", "copy", "other")

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
MATMULS = ("dot", "convolution")
CONTROL_FLOW = ("while", "conditional", "call")
# Opcodes that only move or reshape data: a fusion of these alone is a copy.
DATA_MOVEMENT = frozenset(
  (
    "parameter",
    "constant",
    "copy",
    "copy-start",
    "copy-done",
    "transpose",
    "bitcast",
    "reshape",
    "broadcast",
    "slice",
    "dynamic-slice",
    "dynamic-update-slice",
    "concatenate",
    "pad",
    "reverse",
    "tuple",
    "get-tuple-element",
  )
)


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One HLO instruction, as much of it as categorising needs."""

  opcode: str
  op_name: str  # metadata op_name, "" without one
  calls: tuple[str, ...]  # computations it runs as part of itself: a fusion's body, an async op's wrapped op
  target: str  # custom_call_target, "" without one


_MODULE = re.compile(r"^HloModule\s+([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s=\s(.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")  # the first "name(" after the shape
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")
_CALLED = re.compile(r"\bcalled_computations=\{([^}]*)\}")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')


@dataclasses.dataclass
class Hlo:
  """The instructions of one HLO module (compiled.as_text()), by name, and each computation's instruction names."""

  module: str
  instructions: dict[str, Instruction]
  computations: dict[str, list[str]]

  @classmethod
  def parse(cls, text: str) -> "Hlo":
    module, instructions, computations, current = "", {}, {}, None
    for line in text.splitlines():
      if m := _MODULE.match(line):
        module = m.group(1)
      elif m := _INSTRUCTION.match(line):
        name, rest = m.groups()
        opcode = _OPCODE.search(" " + rest)
        op_name, target = _OP_NAME.search(rest), _TARGET.search(rest)
        calls = _CALLS.findall(rest)
        for group in _CALLED.findall(rest):
          calls += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
        instructions[name] = Instruction(
          opcode.group(1) if opcode else "",
          op_name.group(1) if op_name else "",
          tuple(calls),
          target.group(1) if target else "",
        )
        if current is not None:
          computations[current].append(name)
      elif m := _COMPUTATION.match(line):
        current = m.group(1)
        computations[current] = []
    return cls(module, instructions, computations)

  def inside(self, name: str) -> list[Instruction]:
    """The instruction and, recursively, every instruction of the computations it calls (nested fusions)."""
    out, todo, seen = [], [name], set()
    while todo:
      instruction = self.instructions.get(todo.pop())
      if instruction is None:
        continue
      out.append(instruction)
      for computation in instruction.calls:
        if computation not in seen:
          seen.add(computation)
          todo += self.computations.get(computation, [])
    return out


def in_scope(op_name: str, scope: str) -> bool:
  """Whether a name stack ("jit(f)/transpose(jvp(Model))/layers_0/attention/dot_product_attention/exp") has
  `scope` as one of its parts."""
  return re.search(rf"(^|[/(]){re.escape(scope)}([/)]|$)", op_name) is not None


def _collective(opcode: str) -> bool:
  return opcode.removesuffix("-start").removesuffix("-done") in COLLECTIVES


def category(hlo: Hlo, name: str) -> str | None:
  """The CATEGORIES entry of the instruction `name` of `hlo`; None for control flow (not counted)."""
  instruction = hlo.instructions[name]
  if instruction.opcode in CONTROL_FLOW:
    return None
  inside = hlo.inside(name)
  if any(_collective(i.opcode) for i in inside):
    return "collective"
  if any("fmha" in i.target.lower() for i in inside):  # cuDNN's fused attention, forward or backward
    return "attention"
  matmuls = [i for i in inside if i.opcode in MATMULS or any(w in i.target.lower() for w in ("gemm", "matmul"))]
  if matmuls:  # the attention core's dots are attention, the projections' are matmuls
    return "attention" if any(in_scope(i.op_name, ATTENTION_SCOPE) for i in matmuls) else "matmul"
  if in_scope(instruction.op_name, ATTENTION_SCOPE):
    return "attention"
  if in_scope(instruction.op_name, LAYER_NORM_SCOPE):
    return "layer_norm"
  if all(i.opcode in DATA_MOVEMENT for i in inside if i.opcode != "fusion"):
    return "copy"
  return "other"


def category_by_name(op: str) -> str | None:
  """The category of an op missing from the HLO texts, from its name alone; None for control flow."""
  name = op.lower()
  if re.match(r"(while|conditional|cond|call)(\.|$)", name):
    return None
  if any(c in name for c in COLLECTIVES):
    return "collective"
  if "fmha" in name:
    return "attention"
  if any(w in name for w in ("dot", "gemm", "matmul", "convolution", "cublas", "cudnn")):
    return "matmul"
  if "copy" in name or "transpose" in name:
    return "copy"
  return "other"


def trace_files(log_dir: str) -> list[str]:
  """The .xplane.pb files (one per host) of the newest trace that jax.profiler.trace wrote under log_dir."""
  runs = sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "")))  # date_time names sort by time
  files = sorted(glob.glob(os.path.join(runs[-1], "*.xplane.pb"))) if runs else []
  if not files:
    raise FileNotFoundError(f"No profiler trace (plugins/profile/*/*.xplane.pb) under {log_dir}.")
  return files


def _op_events(plane):
  """(module, op, start and end in nanoseconds, device ordinal) of each executed op on one plane: its "XLA Ops" line
  if it has one, else its events that carry an hlo_op stat."""
  lines = list(plane.lines)
  xla_ops = [line for line in lines if line.name == "XLA Ops"]
  for line in xla_ops or lines:
    for event in line.events:
      stats = dict(event.stats)
      if xla_ops or "hlo_op" in stats:
        op = stats.get("hlo_op", event.name)
        yield stats.get("hlo_module", ""), op, event.start_ns, event.end_ns, stats.get("device_ordinal")


def op_events(files: list[str]) -> tuple[list[tuple], list[str], int]:
  """The executed ops' events (module, op, start_ns, end_ns, device ordinal) in the trace files, the names of the
  planes they are on, and the number of devices: the device planes that hold ops, or without any, the host's ops'
  device ordinals (CPU devices)."""
  device, host = collections.defaultdict(list), collections.defaultdict(list)
  for path in files:
    for plane in jax.profiler.ProfileData.from_file(path).planes:
      where = device if plane.name.startswith("/device:") else host if plane.name.startswith("/host:") else None
      if where is not None:
        where[plane.name] += list(_op_events(plane))
  planes = {name: events for name, events in device.items() if events}
  if planes:
    devices = len(planes)
  else:
    planes = {name: events for name, events in host.items() if events}
    devices = len({ordinal for events in planes.values() for *_, ordinal in events}) or 1
  return [e for events in planes.values() for e in events], sorted(planes), devices


def summarize(log_dir: str, hlo_texts: list[str], calls: int, top: int = 15) -> dict:
  """The newest trace under log_dir, `calls` calls of the program(s) whose HLO texts are given: the time per call
  and device of each category and of the `top` longest ops, and their shares of all the ops' time."""
  files = trace_files(log_dir)
  hlos = [Hlo.parse(text) for text in hlo_texts]
  events, planes, devices = op_events(files)
  times = collections.defaultdict(lambda: [0, 0])  # (module, op): [nanoseconds, calls], summed over the devices
  for module, op, start, end, _ in events:
    times[module, op][0] += end - start
    times[module, op][1] += 1
  rows = []
  for (module, op), (ns, n) in times.items():
    # Instruction names are unique in a module; the trace's module name (when it has one) picks the module.
    hlo = next((h for h in hlos if h.module == module and op in h.instructions), None)
    hlo = hlo or next((h for h in hlos if op in h.instructions), None)
    kind = category(hlo, op) if hlo else category_by_name(op)
    if kind is not None:
      op_name = hlo.instructions[op].op_name if hlo else None
      rows.append({"op": op, "category": kind, "ns": ns, "calls": n, "op_name": op_name})
  if not rows:
    raise ValueError(f"The trace in {os.path.dirname(files[0])} holds no executed XLA ops.")
  total = sum(r["ns"] for r in rows)
  not_in_hlo = sum(r["ns"] for r in rows if r["op_name"] is None)
  per_step = calls * devices
  by_category = {c: sum(r["ns"] for r in rows if r["category"] == c) for c in CATEGORIES}
  rows.sort(key=lambda r: -r["ns"])
  return {
    "trace": os.path.dirname(files[0]),
    "planes": planes,
    "devices": devices,
    "calls": calls,
    # From the first op's start to the last op's end, over all the devices.
    "wall_ms_per_step": _sig((max(e[3] for e in events) - min(e[2] for e in events)) / calls / 1e6),
    "ms_per_step": _sig(total / per_step / 1e6),
    # Ops sorted by their names alone: another program's, or a trace whose op names differ from the HLO's.
    "not_in_hlo_share": round(not_in_hlo / total, 4),
    "categories": {
      c: {"ms_per_step": _sig(ns / per_step / 1e6), "share": round(ns / total, 4)} for c, ns in by_category.items()
    },
    "top_ops": [
      {
        "op": r["op"],
        "category": r["category"],
        "ms_per_step": _sig(r["ns"] / per_step / 1e6),
        "share": round(r["ns"] / total, 4),
        "calls_per_step": _sig(r["calls"] / per_step),
        "op_name": r["op_name"] or "",
      }
      for r in rows[:top]
    ],
    "ops": len(rows),
  }


def _sig(x: float, digits: int = 4) -> float:
  return float(f"{x:.{digits}g}")


def format_table(profile: dict, source_width: int = 70) -> str:
  """The profile as fixed-width text: the categories, then the longest ops with the end of their name stacks."""
  planes = ", ".join(profile["planes"])
  lines = [
    f"{profile['calls']} steps traced on {profile['devices']} device(s) ({planes}): {profile['wall_ms_per_step']} ms "
    "per step from the first op to the last,",
    f"{profile['ms_per_step']} ms per step and device in {profile['ops']} distinct ops (ops that run at once each "
    "count in full)",
  ]
  if profile["not_in_hlo_share"]:
    lines.append(f"{profile['not_in_hlo_share']:.1%} of it in ops missing from the program's HLO, sorted by name")
  lines += [
    "",
    f"{'category':<12} {'ms/step':>10} {'share':>7}",
  ]
  for c, v in profile["categories"].items():
    lines.append(f"{c:<12} {v['ms_per_step']:>10.4g} {v['share']:>7.1%}")
  width = max([len(r["op"]) for r in profile["top_ops"]] + [2])
  lines += ["", f"{'op':<{width}} {'category':<11} {'ms/step':>10} {'share':>7} {'calls/step':>10}  source (op_name)"]
  for r in profile["top_ops"]:
    source = r["op_name"] if len(r["op_name"]) <= source_width else "..." + r["op_name"][3 - source_width :]
    if "transpose(jvp(" in r["op_name"]:  # JAX's name for the backward pass
      source = "(backward) " + source
    lines.append(
      f"{r['op']:<{width}} {r['category']:<11} {r['ms_per_step']:>10.4g} {r['share']:>7.1%} "
      f"{r['calls_per_step']:>10.4g}  {source}"
    )
  return "\n".join(lines)


def save(profile: dict, log_dir: str) -> None:
  """log_dir/profile.txt (the table) and log_dir/profile.json (the profile)."""
  with open(os.path.join(log_dir, "profile.txt"), "w", encoding="utf-8") as f:
    f.write(format_table(profile) + "\n")
  with open(os.path.join(log_dir, "profile.json"), "w", encoding="utf-8") as f:
    json.dump(profile, f, indent=1)
