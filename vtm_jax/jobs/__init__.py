"""The jobs: each a function that the ``vtm-jax`` command and notebooks call alike.

:mod:`.evaluation` (``vtm-jax eval``), :mod:`.training` (``train``), :mod:`.bench`,
:mod:`.sweep`, :mod:`.demo`, :mod:`.predict`, :mod:`.visualize` (drawing in :mod:`.pictures`),
:mod:`.convert`, and
:mod:`.tensorboard` (the scalars they write for TensorBoard).
"""
