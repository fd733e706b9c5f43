"""``python -m vtm_jax``: the ``vtm-jax`` command."""

import sys

from vtm_jax.cli import main

sys.exit(main())
