"""vtm-jax: training-free token merging for video transformers in JAX/Flax."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("vtm-jax")
except _metadata.PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"
