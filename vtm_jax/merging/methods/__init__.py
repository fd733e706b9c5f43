"""The field's other token-reduction methods as merging modes, one module per method.

Each module holds the method's pure functions and its :class:`~vtm_jax.merging.tokens.Rule`
(``RULE``), registered in :data:`vtm_jax.merging.rules.RULES` under the method's mode name.
docs/methods.md describes each method and what vtm-jax does differently, if anything.
"""
