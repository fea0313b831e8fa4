"""Peak host memory of `Blip2.from_pretrained` against the size of the weights it reads (not a test).

  python tests/measure_load_memory.py [--dtype=bfloat16]

Builds a random HF BLIP-2 OPT model of ~440M parameters (ViT 768 x 12, Q-Former 768 x 12, OPT 1024 x 16,
vocab 50272), saves it with `save_pretrained` (float32), then loads it in a fresh process and reports that
process's peak RSS (ru_maxrss) before and after `from_pretrained`. On a CPU backend the loaded parameters live in
host memory too, so one copy of the weights is the floor.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile


def _load(path, dtype):
  import jax  # pylint: disable=g-import-not-at-top

  from blip2_jax.api import Blip2  # pylint: disable=g-import-not-at-top

  jax.numpy.zeros(1).block_until_ready()  # backend up before the baseline
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  model = Blip2.from_pretrained(path, dtype=dtype)
  jax.block_until_ready(model.params)
  after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  n = sum(x.size for x in jax.tree.leaves(model.params))
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params))
  print(json.dumps({"params": n, "loaded_bytes": nbytes, "peak_rss_before": before, "peak_rss_after": after}))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--child", default=None)
  args = parser.parse_args()
  if args.child:
    return _load(args.child, args.dtype)
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  config = transformers.Blip2Config(
    vision_config=dict(
      hidden_size=768,
      intermediate_size=3072,
      num_hidden_layers=12,
      num_attention_heads=12,
      image_size=224,
      patch_size=14,
    ),
    qformer_config=dict(
      hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, encoder_hidden_size=768
    ),
    text_config=dict(
      model_type="opt",
      vocab_size=50272,
      hidden_size=1024,
      num_hidden_layers=16,
      ffn_dim=4096,
      num_attention_heads=16,
      max_position_embeddings=2048,
      word_embed_proj_dim=1024,
    ),
    num_query_tokens=32,
    image_token_index=50265,
  )
  with tempfile.TemporaryDirectory() as tmp:
    with torch.device("cpu"):
      model = transformers.Blip2ForConditionalGeneration(config)
    model.save_pretrained(tmp)
    size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp) if f.endswith(".safetensors"))
    del model
    r = subprocess.run(
      [sys.executable, __file__, f"--child={tmp}", f"--dtype={args.dtype}"], capture_output=True, text=True, check=False
    )
    if r.returncode:
      raise SystemExit(r.stderr[-3000:])
    out = r.stdout.strip().splitlines()[-1]
  r = json.loads(out)
  gib = 2**30
  print(f"checkpoint on disk (float32): {size / gib:.2f} GiB, {r['params'] / 1e6:.0f}M parameters")
  print(f"loaded parameters ({args.dtype} frozen parts): {r['loaded_bytes'] / gib:.2f} GiB")
  print(
    f"peak RSS: {r['peak_rss_before'] / gib:.2f} GiB before loading, {r['peak_rss_after'] / gib:.2f} GiB after "
    f"(+{(r['peak_rss_after'] - r['peak_rss_before']) / gib:.2f} GiB = "
    f"{(r['peak_rss_after'] - r['peak_rss_before']) / r['loaded_bytes']:.2f} x the loaded parameters)"
  )


if __name__ == "__main__":
  main()
