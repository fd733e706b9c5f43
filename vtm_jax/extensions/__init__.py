"""Extensions shipped with vtm_jax, each registered through the public extension API.

``vtm_jax.reduction`` imports this package the first time a mode name is not registered, so
shipped modes (``tube_merge``) can be named in a config without an import.
"""

from vtm_jax.extensions import tube as tube

__all__ = ["tube"]
