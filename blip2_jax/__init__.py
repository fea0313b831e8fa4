"""blip2_jax: BLIP-2 in JAX/Flax. `blip2_jax.Blip2.from_pretrained(dir)` loads a Hugging Face BLIP-2 checkpoint."""


def __getattr__(name):
  # Lazy, so `python -m blip2_jax.train` does not import the pretrained-model API (and its dependencies) first.
  if name == "Blip2":
    from blip2_jax.pretrained import Blip2  # pylint: disable=g-import-not-at-top
    return Blip2
  raise AttributeError(f"module 'blip2_jax' has no attribute {name!r}")
