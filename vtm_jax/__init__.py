"""vtm-jax: training-free token merging for video transformers in JAX/Flax.

The Python API (:mod:`vtm_jax.api`) is importable from here: ``vtm_jax.load``,
``vtm_jax.classify``, ``vtm_jax.MergingSettings``, the merge functions ... Its names are
loaded on first use (module ``__getattr__``), so ``import vtm_jax`` imports no JAX and the
``vtm-jax`` command starts as fast as before.
"""

from importlib import metadata as _metadata
from typing import Any as _Any

try:
    __version__ = _metadata.version("vtm-jax")
except _metadata.PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"

# The names of vtm_jax.api's __all__, written out so that dir() and tab completion see them
# without importing JAX; tests/test_api.py checks the two lists agree.
_API = frozenset(
    {
        "RULES",
        "Match",
        "MergingSettings",
        "ModelRecord",
        "Rule",
        "RuleOption",
        "Tokens",
        "UserError",
        "bipartite_soft_matching",
        "classify",
        "cosine_scores",
        "demo_checkpoint",
        "drop",
        "load",
        "load_clip",
        "merge_tokens",
        "merge_wavg",
        "prepare_clip",
        "random_scores",
        "register_rule",
        "register_schedule",
        "settings",
        "token_counts",
        "top_k",
        "unmerge",
        "with_merging",
    }
)

__all__ = ["__version__", *sorted(_API)]


# Names of vtm-jax 0.1, still answered (with a DeprecationWarning) until 0.3.
_RENAMED = {"ReductionSettings": "MergingSettings", "reduce_tokens": "merge_tokens"}


def __getattr__(name: str) -> _Any:
    if name in _RENAMED:
        import warnings

        new = _RENAMED[name]
        warnings.warn(
            f"vtm_jax.{name} is now vtm_jax.{new}; the old name goes in vtm-jax 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return __getattr__(new)
    if name in _API:
        from vtm_jax import api

        value = getattr(api, name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'vtm_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API)
