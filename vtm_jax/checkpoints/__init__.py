"""Checkpoints: the typed model record, orbax read/write with digests, converters, frame counts.

:mod:`.record` (``model.json``: what a checkpoint's model is and how to feed it),
:mod:`.store` (saving and loading checkpoint directories, Scenic msgpack included),
:mod:`.integrity` (digests and finiteness checks), :mod:`.frame_count` (running a checkpoint
at another frame count), :mod:`.convert` (HuggingFace, Scenic, Motionformer and the paper's
torch files to vtm-jax's parameter trees).
"""
