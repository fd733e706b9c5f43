"""Checkpoint conversion: HuggingFace and Scenic weights to vtm_jax's Flax parameter trees."""
