"""blip2_jax: BLIP-2 in JAX/Flax. `blip2_jax.Blip2.from_pretrained(dir)` loads a Hugging Face BLIP-2 checkpoint."""


def __getattr__(name):
  # Lazy: importing any submodule (blip2_jax.models.vit, ...) runs this file first, and the API pulls in the whole
  # package with transformers, Orbax and TFDS. Nothing in the package imports blip2_jax itself.
  if name == "Blip2":
    from blip2_jax.api import Blip2  # pylint: disable=g-import-not-at-top

    return Blip2
  raise AttributeError(f"module 'blip2_jax' has no attribute {name!r}")
