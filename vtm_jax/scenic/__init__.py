"""Everything Scenic-specific: its ViViT config files, its bare checkpoints, its model class.

:mod:`vtm_jax.scenic.config` reads Scenic ViViT config files (defaults, checks, translation to
a model record), :mod:`vtm_jax.scenic.checkpoint` describes a bare Scenic checkpoint from the
config that names it, and :mod:`vtm_jax.scenic.model` is the Scenic model class on vtm_jax's
ViViT. This package builds on vtm_jax's core (records, models, config blocks, the Scenic
weight reader in :mod:`vtm_jax.convert.scenic`); nothing in the core imports it, only the
front ends that read config files (:mod:`vtm_jax.config`, the command line, the sweep).
"""
