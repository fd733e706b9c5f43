"""Experiment configs: loading (a shipped config by name or a file), the shared blocks, the
paper's configs, and Scenic ViViT config files read as Scenic reads them.

:mod:`.loading` (``load_config``, records and preprocessing from a config),
:mod:`.shipped` (the configs installed with the package, by name), :mod:`.blocks` (the
``token_merging``, ``eval``, ``bench`` and ``training`` blocks), :mod:`.paper` (the paper's
protocol as configs), :mod:`.scenic` and :mod:`.scenic_checkpoint` (Scenic's schema).
"""
