"""What the accelerator check's steps share: the models they run, their weights and the clock.

``load`` gives a paper config's model record and merging settings, cut to a tiny model for the
smoke run (``--smoke``: the same code on the CPU in about a minute); ``random_weights`` gives
weights without compiling the model's ``init``; ``Budget`` is the time guard that lets the full
run fit one short accelerator loan: a step that would overrun is skipped and recorded.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

# The smoke run's model: every backbone at this size keeps its own code paths (patching,
# merging at the paper's r, clamped to the few tokens there are) and compiles in seconds.
SMOKE_MODEL = {"hidden_size": 32, "num_heads": 2, "mlp_dim": 64, "num_layers": 2}
SMOKE_INPUT = {"image_size": 32, "num_frames": 8, "num_classes": 10}


def smoke_record(record: Any, num_layers: int | None = None) -> Any:
    """``record`` cut to the smoke size (``SMOKE_MODEL``; keys such as ``spatial_num_heads``
    are matched by their ending), input 8x32x32, 10 classes."""
    layers = num_layers or SMOKE_MODEL["num_layers"]
    model = {}
    for key, value in record.model.items():
        for name, small in SMOKE_MODEL.items():
            if key.endswith(name):
                value = min(value, layers) if name == "num_layers" else small
        if key == "representation_size" and value:
            value = SMOKE_MODEL["hidden_size"]
        if key == "num_classes":
            value = SMOKE_INPUT["num_classes"]
        model[key] = value
    return dataclasses.replace(
        record,
        model=model,
        image_size=SMOKE_INPUT["image_size"],
        num_frames=SMOKE_INPUT["num_frames"],
    )


def cut_layers(record: Any, num_layers: int) -> Any:
    """``record`` with every ``*num_layers`` entry at most ``num_layers`` (all token counts and
    merge steps of those layers stay the real ones)."""
    model = {
        k: min(v, num_layers) if k.endswith("num_layers") else v for k, v in record.model.items()
    }
    return dataclasses.replace(record, model=model)


def load(config_name: str, *, smoke: bool, num_layers: int | None = None) -> tuple[Any, Any]:
    """The model record and the paper's merging settings of a shipped config (``vivit_b_k400``);
    ``smoke``: the tiny model; ``num_layers``: the layers cut to that many."""
    from vtm_jax.config.loading import load_config, record_from_config
    from vtm_jax.merging import MergingSettings

    config = load_config(config_name)
    record = record_from_config(config)
    if smoke:
        record = smoke_record(record, num_layers)
    elif num_layers is not None:
        record = cut_layers(record, num_layers)
    return record, MergingSettings.from_dict(config.token_merging)


def random_weights(model: Any, clip: Any, seed: int = 0) -> Any:
    """Random weights of ``model`` for input ``clip``, made on the host from the parameter
    shapes alone (no ``init`` to compile): LayerNorm scales ``1 + N(0, 0.02)``, every other
    leaf ``N(0, 0.02)``, ViT's initial scale. No leaf is zero, so no logit is 0 by construction
    (a zero-initialised head would make every comparison empty)."""
    import jax
    import numpy as np

    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed), clip)["params"]
    rng = np.random.default_rng(seed)

    def draw(path: tuple, leaf: Any) -> np.ndarray:
        noise = 0.02 * rng.standard_normal(leaf.shape).astype(np.float32)
        is_scale = getattr(path[-1], "key", None) == "scale"
        return (1.0 + noise if is_scale else noise).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def random_clips(batch: int, num_frames: int, size: int, seed: int = 0) -> Any:
    """``batch`` random clips ``[B, T, H, W, 3]`` in [0, 1), float32."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.random((batch, num_frames, size, size, 3), dtype=np.float32)


def forward(model: Any) -> Any:
    """``f(params, clips) -> logits`` for ``jax.jit``."""
    return lambda params, clips: model.apply({"params": params}, clips)


class Budget:
    """The check's time guard: a deadline, and an estimate of a step from the steps so far.

    A step of a ``kind`` (e.g. one batch size) is expected to cost as much as the dearest step
    of that kind so far, or of any kind when none has run yet; a step that would end past the
    deadline is skipped (its row says so) instead of overrunning the loan.
    """

    def __init__(self, seconds: float, start: float | None = None) -> None:
        self.start = time.monotonic() if start is None else start
        self.deadline = self.start + seconds
        self.costs: dict[Any, list[float]] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def estimate(self, kind: Any) -> float:
        same = self.costs.get(kind)
        every = [c for costs in self.costs.values() for c in costs]
        return max(same or every or [0.0])

    def allows(self, kind: Any) -> bool:
        """Whether a step of ``kind`` is expected to end before the deadline."""
        return time.monotonic() + self.estimate(kind) <= self.deadline

    def record(self, kind: Any, seconds: float) -> None:
        self.costs.setdefault(kind, []).append(seconds)


def relative_difference(got: Sequence[Any], expected: Any) -> tuple[float, float]:
    """``(max |got - expected|, that / max |expected|)`` over the clips both have."""
    import numpy as np

    expected = np.asarray(expected, np.float32)
    got = np.asarray(got, np.float32)[: len(expected)]
    diff = float(np.abs(got - expected[: len(got)]).max())
    return diff, diff / max(float(np.abs(expected).max()), 1e-30)
