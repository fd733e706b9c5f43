"""The former name of :mod:`vtm_jax.scenic.model`, kept so that existing imports and
``python -m vtm_jax.scenic_model --config=... --workdir=...`` still work."""

import sys

from vtm_jax.scenic import model as _model

if __name__ == "__main__":
    _model.run()
else:
    # One module under both names: patching an attribute through either name is seen by both.
    sys.modules[__name__] = _model
