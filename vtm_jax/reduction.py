"""Deprecated names of vtm-jax 0.1: the settings and rules are in :mod:`vtm_jax.merging` now.

``ReductionSettings`` is :class:`vtm_jax.merging.MergingSettings`, ``ReduceContext`` is
:class:`vtm_jax.tokens.MergeContext` and ``reduce_tokens`` is
:func:`vtm_jax.merging.merge_tokens`. Importing this module warns; it goes in 0.3.
"""

import warnings

from vtm_jax.merging import *  # noqa: F403 (every public name, as 0.1 had them here)
from vtm_jax.merging import MergingSettings as ReductionSettings  # noqa: F401
from vtm_jax.merging import merge_tokens as reduce_tokens  # noqa: F401
from vtm_jax.tokens import MergeContext as ReduceContext  # noqa: F401

warnings.warn(
    "vtm_jax.reduction is now vtm_jax.merging (ReductionSettings is MergingSettings, "
    "reduce_tokens is merge_tokens); the old names go in vtm-jax 0.3",
    DeprecationWarning,
    stacklevel=2,
)
