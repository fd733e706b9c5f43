"""``python -m vtm_jax.cli``: the ``vtm-jax`` command."""

import sys

from vtm_jax.cli import main

sys.exit(main())
