"""Merging rules shipped with vtm_jax beyond the paper's modes.

Each is written against the rule types of :mod:`vtm_jax.tokens` alone, as an outside
package's rule would be; :mod:`vtm_jax.merging` imports them and registers them under their
names (``tube_merge``) with the built-in modes, so they are listed and usable from the start.
"""

from vtm_jax.extensions import tube as tube

__all__ = ["tube"]
