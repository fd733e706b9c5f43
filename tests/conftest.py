import os

import pytest

# Tests never reach a hub and always run on the CPU.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

TINY_MODELS = {
    # Two layers, 32 wide, (2, 8, 8) tubelets: 16 frames of 32x32 pixels are 128 tokens.
    "vivit": dict(hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, patch_size=(2, 8, 8)),
    "videomae": dict(hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, patch_size=(2, 8, 8)),
}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A factory of small random checkpoints, saved as `vtm-jax convert` writes them.

    ``tiny_checkpoint(architecture="vivit", frames=16, size=32, num_classes=8)`` returns the
    directory; the same arguments return the same checkpoint. Weights are perturbed so the
    (zero-initialised) classifier does not predict one class for every video. The recorded
    preprocessing fits the synthetic dataset (stride 1, [-1, 1] pixels).
    """
    made: dict[tuple, str] = {}

    def make(
        architecture: str = "vivit",
        *,
        frames: int = 16,
        size: int = 32,
        num_classes: int = 8,
        labels: tuple[str, ...] | None = None,
    ):
        """``labels``: class names for the record (then ``num_classes`` is their count)."""
        if labels is not None:
            num_classes = len(labels)
        key = (architecture, frames, size, num_classes, labels)
        if key in made:
            return made[key]
        import jax
        import numpy as np

        from vtm_jax.checkpoints.record import ModelRecord
        from vtm_jax.checkpoints.store import save_checkpoint
        from vtm_jax.models.registry import ARCHITECTURES

        kwargs = {**TINY_MODELS[architecture], "num_classes": num_classes}
        video = np.zeros((1, frames, size, size, 3), np.float32)
        params = ARCHITECTURES[architecture](**kwargs).init(jax.random.PRNGKey(0), video)["params"]
        params = jax.tree.map(
            lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params
        )
        record = {
            "architecture": architecture,
            "model": {**kwargs, "patch_size": list(kwargs["patch_size"])},
            "input": {"num_frames": frames, "image_size": size},
            "preprocessing": {
                "num_frames": frames,
                "stride": 1,
                "min_resize": size,
                "crop_size": size,
                "mean": [0.5] * 3,
                "std": [0.5] * 3,
            },
            "labels": None if labels is None else list(labels),
            "token_merging": {"mode": "none"},
        }
        path = str(tmp_path_factory.mktemp(f"{architecture}_{frames}f") / "ckpt")
        save_checkpoint(path, jax.device_get(params), ModelRecord.from_json(record))
        made[key] = path
        return path

    return make
