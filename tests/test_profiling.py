"""blip2_jax.profiling: the ops of a traced program, their categories from its HLO, and the GPU / TPU trace layouts
(hand-made traces: the suite runs on CPU)."""

import os

import jax
import jax.numpy as jnp
import pytest

from blip2_jax import profiling


def _profile(fn, args, log_dir, calls=2):
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  with jax.profiler.trace(str(log_dir)):
    for _ in range(calls):
      out = compiled(*args)
    jax.block_until_ready(out)
  return profiling.summarize(str(log_dir), [compiled.as_text()], calls, top=100)


def test_a_traced_cpu_program_is_sorted_by_name_scope_and_opcode(tmp_path):
  def f(x, w):
    with jax.named_scope(profiling.ATTENTION_SCOPE):
      a = jax.nn.softmax(jnp.einsum("qd,kd->qk", x, x), axis=-1) @ x
    with jax.named_scope(profiling.LAYER_NORM_SCOPE):
      h = a * jax.lax.rsqrt(jnp.mean(a * a, axis=-1, keepdims=True) + 1e-6)
    return jnp.tanh(h @ w), jnp.transpose(x.reshape(16, 16, -1), (1, 0, 2))

  x, w = jnp.ones((256, 128)), jnp.ones((128, 128)) / 128
  profile = _profile(f, (x, w), tmp_path)
  assert profile["planes"] == ["/host:CPU"] and profile["devices"] == 1 and profile["calls"] == 2
  assert profile["not_in_hlo_share"] == 0  # the trace's op names are the HLO's
  rows = profile["top_ops"]
  assert len(rows) == profile["ops"]  # top=100: every op
  assert sum(r["share"] for r in rows) == pytest.approx(1, abs=1e-3)
  assert sum(c["share"] for c in profile["categories"].values()) == pytest.approx(1, abs=1e-3)
  assert all(r["ms_per_step"] > 0 and r["calls_per_step"] == 1 for r in rows)
  by_category = {c: [r for r in rows if r["category"] == c] for c in profiling.CATEGORIES}
  for c in ("attention", "matmul", "layer_norm", "copy"):
    assert by_category[c], c
  assert all(profiling.ATTENTION_SCOPE in r["op_name"] for r in by_category["attention"])
  assert all(profiling.LAYER_NORM_SCOPE in r["op_name"] for r in by_category["layer_norm"])
  assert any("transpose" in r["op_name"] for r in by_category["copy"])
  assert profile["wall_ms_per_step"] > 0
  table = profiling.format_table(profile)
  assert "attention" in table and by_category["matmul"][0]["op"] in table


def test_a_loops_body_ops_count_per_iteration_and_the_loop_itself_not_at_all(tmp_path):
  # On the CPU the while op's own event spans its body's: counting both would count the body twice.
  def f(x, w):
    return jax.lax.fori_loop(0, 4, lambda i, h: jnp.tanh(h @ w), x)

  profile = _profile(f, (jnp.ones((128, 128)), jnp.ones((128, 128)) / 128), tmp_path)
  assert not [r for r in profile["top_ops"] if r["op"].startswith("while")]
  (matmul,) = [r for r in profile["top_ops"] if r["category"] == "matmul"]
  assert matmul["calls_per_step"] == 4


# GPU and TPU forms, by hand: a cuBLAS GEMM in the attention scope, cuDNN's fused attention, a Triton GEMM fusion,
# async collectives, host offload copies, a dynamic-update-slice fusion, a loop.
HLO = "\n".join(
  [
    "HloModule jit_step, is_scheduled=true",
    "",
    "%gemm_body (p0: bf16[8,64], p1: bf16[64,64]) -> bf16[8,64] {",
    "  %p0 = bf16[8,64]{1,0} parameter(0)",
    "  %p1 = bf16[64,64]{1,0} parameter(1)",
    "  ROOT %dot.1 = bf16[8,64]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, "
    'metadata={op_name="jit(step)/mlp/fc1/dot_general"}',
    "}",
    "",
    "%wrapped_reduce_scatter (p: f32[64]) -> f32[8] {",
    "  %p = f32[64]{0} parameter(0)",
    "  ROOT %reduce-scatter.1 = f32[8]{0} reduce-scatter(%p), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, "
    "to_apply=%add",
    "}",
    "",
    "%dus_body (p0: f32[4,64], p1: f32[1,64], p2: s32[]) -> f32[4,64] {",
    "  %p0 = f32[4,64]{1,0} parameter(0)",
    "  %p1 = f32[1,64]{1,0} parameter(1)",
    "  %p2 = s32[] parameter(2)",
    "  %c = s32[] constant(0)",
    "  ROOT %dynamic-update-slice.1 = f32[4,64]{1,0} dynamic-update-slice(%p0, %p1, %p2, %c)",
    "}",
    "",
    "%norm_body (p0: f32[8,64], p1: f32[8]) -> f32[8,64] {",
    "  %p0 = f32[8,64]{1,0} parameter(0)",
    "  %p1 = f32[8]{0} parameter(1)",
    "  %b = f32[8,64]{1,0} broadcast(%p1), dimensions={0}",
    '  ROOT %multiply.3 = f32[8,64]{1,0} multiply(%p0, %b), metadata={op_name="jit(step)/ln_vision/layer_norm/mul"}',
    "}",
    "",
    "%add_body (p0: f32[8,64], p1: f32[8,64]) -> f32[8,64] {",
    "  %p0 = f32[8,64]{1,0} parameter(0)",
    "  %p1 = f32[8,64]{1,0} parameter(1)",
    '  ROOT %add.3 = f32[8,64]{1,0} add(%p0, %p1), metadata={op_name="jit(step)/layers/attention/add"}',
    "}",
    "",
    "ENTRY %main (x: bf16[8,64], w: bf16[64,64], g: f32[64]) -> bf16[8,64] {",
    "  %x = bf16[8,64]{1,0} parameter(0)",
    "  %w = bf16[64,64]{1,0} parameter(1)",
    "  %g = f32[64]{0} parameter(2)",
    "  %triton_gemm = bf16[8,64]{1,0} fusion(%x, %w), kind=kCustom, calls=%gemm_body, "
    'metadata={op_name="jit(step)/mlp/fc1/dot_general"}, '
    'backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}',
    '  %custom-call.3 = (bf16[8,64]{1,0}, s8[1024]{0}) custom-call(%x, %w), custom_call_target="__cublas$gemm", '
    'metadata={op_name="jit(step)/transpose(jvp(vit))/blocks/attn/dot_product_attention/dot_general"}',
    "  %custom-call.4 = (bf16[2,8,4,16]{3,2,1,0}, u8[0]{0}) custom-call(%x, %x, %x), "
    'custom_call_target="__cudnn$fmhaSoftmax", '
    'metadata={op_name="jit(step)/vit/blocks/attn/dot_product_attention/dot_product_attention"}',
    '  %custom-call.5 = (bf16[8,64]{1,0}, s8[1024]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", '
    'metadata={op_name="jit(step)/layers/attention/query/dot_general"}',
    "  %all-reduce-start.2 = f32[64]{0} all-reduce-start(%g), replica_groups={}, to_apply=%add",
    "  %all-reduce-done.2 = f32[64]{0} all-reduce-done(%all-reduce-start.2)",
    "  %reduce-scatter-start = ((f32[64]{0}), f32[8]{0}) async-start(%g), calls=%wrapped_reduce_scatter",
    "  %reduce-scatter-done = f32[8]{0} async-done(%reduce-scatter-start), calls=%wrapped_reduce_scatter",
    "  %copy-start.1 = (f32[64]{0}, f32[64]{0:S(5)}, u32[]) copy-start(%g)",
    "  %dus_fusion = f32[4,64]{1,0} fusion(%a, %b, %i), kind=kLoop, calls=%dus_body",
    "  %norm_fusion = f32[8,64]{1,0} fusion(%h, %r), kind=kLoop, calls=%norm_body, "
    'metadata={op_name="jit(step)/ln_vision/layer_norm/mul"}',
    "  %add_fusion = f32[8,64]{1,0} fusion(%h, %h), kind=kLoop, calls=%add_body, "
    'metadata={op_name="jit(step)/layers/attention/add"}',
    '  %while.1 = (s32[], f32[64]{0}) while(%t), condition=%cond, body=%body, metadata={op_name="jit(step)/while"}',
    "  ROOT %out = bf16[8,64]{1,0} copy(%triton_gemm)",
    "}",
  ]
)
EXPECTED = {
  "triton_gemm": "matmul",
  "custom-call.3": "attention",  # a GEMM of the attention core (its backward)
  "custom-call.4": "attention",
  "custom-call.5": "matmul",  # the Q-Former's "attention" module's query projection is a matmul
  "all-reduce-start.2": "collective",
  "all-reduce-done.2": "collective",
  "reduce-scatter-start": "collective",
  "reduce-scatter-done": "collective",
  "copy-start.1": "copy",
  "dus_fusion": "copy",
  "norm_fusion": "layer_norm",
  "add_fusion": "other",
  "while.1": None,  # control flow: its body's ops are counted
  "out": "copy",
}


def test_hlo_categories_of_gpu_and_tpu_forms():
  hlo = profiling.Hlo.parse(HLO)
  assert hlo.module == "jit_step"
  assert {name: profiling.category(hlo, name) for name in EXPECTED} == EXPECTED
  by_name = {
    "all-reduce.3": "collective",
    "copy.2": "copy",
    "transpose.1": "copy",
    "dot.4": "matmul",
    "gemm": "matmul",
    "cudnn": "matmul",
    "fmha": "attention",
    "loop_add_fusion": "other",
    "while.2": None,
    "cond.5.clone": None,
  }
  assert {op: profiling.category_by_name(op) for op in by_name} == by_name
  assert profiling.in_scope("jit(f)/transpose(jvp(dot_product_attention))/exp", profiling.ATTENTION_SCOPE)
  assert not profiling.in_scope("jit(f)/layers_0/attention/query/dot_general", profiling.ATTENTION_SCOPE)
  assert not profiling.in_scope("jit(f)/decoder/final_layer_norm/add", profiling.LAYER_NORM_SCOPE)


def _plane(plane_id, name, lines, events, stats):
  """A text-format XPlane: lines [(name, [(event metadata id, start ps, duration ps, {stat id: str})])]."""
  out = [f'planes {{ id: {plane_id} name: "{name}"']
  for i, (line, line_events) in enumerate(lines):
    out.append(f'  lines {{ id: {i} name: "{line}" timestamp_ns: 1000000')
    for metadata_id, start, duration, line_stats in line_events:
      stat_text = " ".join(f'stats {{ metadata_id: {k} str_value: "{v}" }}' for k, v in line_stats.items())
      out.append(f"    events {{ metadata_id: {metadata_id} offset_ps: {start} duration_ps: {duration} {stat_text} }}")
    out.append("  }")
  for k, v in events.items():
    out.append(f'  event_metadata {{ key: {k} value {{ id: {k} name: "{v}" }} }}')
  for k, v in stats.items():
    out.append(f'  stat_metadata {{ key: {k} value {{ id: {k} name: "{v}" }} }}')
  out.append("}")
  return "\n".join(out)


def _write_trace(log_dir, planes: list[str]):
  run = os.path.join(log_dir, "plugins", "profile", "2026_01_01_00_00_00")
  os.makedirs(run)
  space = jax.profiler.ProfileData.text_proto_to_serialized_xspace("\n".join(planes))
  with open(os.path.join(run, "host.xplane.pb"), "wb") as f:
    f.write(space)


def test_device_planes_gpu_kernels_and_tpu_xla_ops_lines(tmp_path):
  hlo_stats = {1: "hlo_op", 2: "hlo_module"}
  ms = 1_000_000_000  # picoseconds
  gemm = {1: "triton_gemm", 2: "jit_step"}
  gpus = [
    # A GPU: kernels on stream lines carry hlo_op; a fusion may run as two kernels; a memcpy carries none.
    _plane(
      1 + d,
      f"/device:GPU:{d}",
      [("Stream #7(Compute)", [(1, 0, 2 * ms, gemm), (2, 3 * ms, ms, gemm), (3, 5 * ms, ms, {})])],
      {1: "sm90_gemm_kernel", 2: "split_k_reduce", 3: "MemcpyD2H"},
      hlo_stats,
    )
    for d in range(2)
  ]
  host = _plane(9, "/host:CPU", [("python", [(1, 0, 50 * ms, {1: "triton_gemm"})])], {1: "launch"}, hlo_stats)
  _write_trace(tmp_path / "gpu", [*gpus, host])
  profile = profiling.summarize(str(tmp_path / "gpu"), [HLO], calls=1)
  assert profile["planes"] == ["/device:GPU:0", "/device:GPU:1"] and profile["devices"] == 2
  assert profile["not_in_hlo_share"] == 0
  # The host's launch event is not an op's time when devices were traced; the two kernels are one op's.
  assert profile["top_ops"] == [
    {
      "op": "triton_gemm",
      "category": "matmul",
      "ms_per_step": 3.0,
      "share": 1.0,
      "calls_per_step": 2.0,
      "op_name": "jit(step)/mlp/fc1/dot_general",
    }
  ]

  # A TPU: its "XLA Ops" line names the ops (the events span nothing else on it but a loop's body).
  tpu = _plane(
    1,
    "/device:TPU:0",
    [
      ("XLA Modules", [(1, 0, 10 * ms, {})]),
      ("XLA Ops", [(2, 0, 6 * ms, {}), (3, 0, 4 * ms, {}), (4, 6 * ms, 2 * ms, {}), (5, 8 * ms, ms, {})]),
    ],
    {1: "jit_step(1)", 2: "while.1", 3: "custom-call.4", 4: "all-reduce-start.2", 5: "all-gather.9"},
    {},
  )
  _write_trace(tmp_path / "tpu", [tpu])
  profile = profiling.summarize(str(tmp_path / "tpu"), [HLO], calls=2)
  assert profile["devices"] == 1 and profile["ms_per_step"] == 3.5 and profile["wall_ms_per_step"] == 4.5
  assert [(r["op"], r["category"], r["ms_per_step"]) for r in profile["top_ops"]] == [
    ("custom-call.4", "attention", 2.0),
    ("all-reduce-start.2", "collective", 1.0),
    ("all-gather.9", "collective", 0.5),  # not in the HLO: by its name
  ]
  assert profile["categories"]["attention"]["share"] == pytest.approx(4 / 7, abs=1e-3)
  assert profile["not_in_hlo_share"] == pytest.approx(1 / 7, abs=1e-3)
  assert "14.3% of it in ops missing from the program's HLO" in profiling.format_table(profile)
