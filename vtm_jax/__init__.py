"""vtm-jax: training-free token merging for video transformers in JAX/Flax.

The Python API (:mod:`vtm_jax.api`) is importable from here: ``vtm_jax.load``,
``vtm_jax.classify``, ``vtm_jax.MergingSettings``, the merge functions ... Its names are
loaded on first use (module ``__getattr__``), so ``import vtm_jax`` imports no JAX and the
``vtm-jax`` command starts as fast as before.
"""

import importlib as _importlib
import importlib.abc as _abc
import importlib.util as _util
import sys as _sys
import types as _types
import warnings as _warnings
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
        "EvalSpec",
        "Match",
        "MergingSettings",
        "ModelRecord",
        "Preprocessing",
        "RULES",
        "Rule",
        "RuleOption",
        "Tokens",
        "UserError",
        "bench",
        "bench_settings",
        "bipartite_soft_matching",
        "classify",
        "convert",
        "cosine_scores",
        "demo",
        "demo_checkpoint",
        "drop",
        "eval_config",
        "eval_views",
        "evaluate",
        "load",
        "load_clip",
        "load_config",
        "merge_tokens",
        "merge_wavg",
        "predict",
        "prepare_clip",
        "random_scores",
        "register_rule",
        "register_schedule",
        "settings",
        "shipped_configs",
        "sweep",
        "token_counts",
        "top_k",
        "train",
        "unmerge",
        "visualize",
        "with_merging",
    }
)

__all__ = ["__version__", *sorted(_API)]


# Names of vtm-jax 0.1, still answered (with a DeprecationWarning) until 0.3.
_RENAMED = {"ReductionSettings": "MergingSettings", "reduce_tokens": "merge_tokens"}


def __getattr__(name: str) -> _Any:
    if name in _RENAMED:
        new = _RENAMED[name]
        _warnings.warn(
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


# Modules of vtm-jax 0.2 (and 0.1's ``reduction``) and where they live now: importing an old
# name still works, with a DeprecationWarning, until vtm-jax 0.4 (docs/architecture.md). The
# old modules named like a job (evaluate, train, bench's sweep, ...) are not here: those names
# are the job functions of the API now (``vtm_jax.evaluate(...)``).
_MOVED = {
    "attention": "models.attention",
    "benchmark": "jobs.bench",
    "checkpoint": "checkpoints.store",
    "config_blocks": "config.blocks",
    "evaluation": "jobs.evaluation",
    "extensions": "merging",
    "frames": "checkpoints.frame_count",
    "integrity": "checkpoints.integrity",
    "merge": "merging.matching",
    "metrics": "jobs.tensorboard",
    "paper": "config.paper",
    "record": "checkpoints.record",
    "reduction": "merging",
    "run_eval": "jobs.evaluation.from_config",
    "schedule": "merging.schedule",
    "scenic_model": "scenic.model",
    "tokens": "merging.tokens",
    "training": "jobs.training",
}


class _MovedModule(_abc.MetaPathFinder, _abc.Loader):
    """Answers an old module name with the module at its new place (``python -m`` too)."""

    def find_spec(self, fullname: str, path: _Any = None, target: _Any = None) -> _Any:
        old = fullname.removeprefix(__name__ + ".")
        if old == fullname or old not in _MOVED:
            return None
        return _util.spec_from_loader(fullname, self)

    def _new_name(self, fullname: str) -> str:
        return f"{__name__}.{_MOVED[fullname.removeprefix(__name__ + '.')]}"

    def create_module(self, spec: _Any) -> _types.ModuleType:
        new = self._new_name(spec.name)
        _warnings.warn(
            f"{spec.name} is now {new}; the old name goes in vtm-jax 0.4",
            DeprecationWarning,
            stacklevel=2,
        )
        module = _importlib.import_module(new)
        if spec.name.endswith(".reduction"):  # 0.1's names, beside the package's
            alias = _types.ModuleType(spec.name, module.__doc__)
            alias.__dict__.update({k: v for k, v in vars(module).items() if k[0] != "_"})
            alias.ReductionSettings = module.MergingSettings
            alias.ReduceContext = module.MergeContext
            alias.reduce_tokens = module.merge_tokens
            return alias
        return module

    def exec_module(self, module: _types.ModuleType) -> None:
        pass  # the module at the new place has run already

    def get_code(self, fullname: str) -> _Any:
        new = self._new_name(fullname)  # ``python -m old.name`` runs the new module
        return _util.find_spec(new).loader.get_code(new)


_sys.meta_path.append(_MovedModule())
