"""The shipped experiment configs, one ``get_config()`` file each (``vtm-jax configs`` lists them).

Installed with the package, so ``--config=NAME`` finds them anywhere; in a checkout they are also
reachable as ``configs/NAME.py``. They are read as files (``vtm_jax.config.loading``), never
imported as modules of this package.
"""
