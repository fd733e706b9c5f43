"""Scenic interop on the side: a Scenic ``ClassificationModel`` whose module is vtm-jax's ViViT.

:mod:`vtm_jax.scenic.model` needs Scenic installed (the ``scenic`` extra). It builds on the
core (records, models, config blocks, :mod:`vtm_jax.config.scenic` for Scenic's config schema
and :mod:`vtm_jax.checkpoints.convert.scenic` for its weights); nothing in vtm-jax imports it.
"""
