"""Record the parameter shapes Scenic's own ViViT module declares for models 3 and 4.

Scenic's ``ViViTClassificationModel`` (``scenic/projects/vivit/model.py``) is built from a
Scenic-style config of each case below and initialised abstractly (``jax.eval_shape``: nothing
is computed), and every parameter path with its shape is written to
``tests/scenic_factorised_shapes.json``. ``tests/test_vivit_factorised.py`` checks vtm-jax's
models 3 and 4 against these recorded facts on every run, Scenic installed or not.

Run with Scenic importable, at the commit below (the one ``pyproject.toml``'s ``scenic`` extra
pins)::

    PYTHONPATH=path/to/scenic python scripts/record_scenic_factorised_shapes.py

The shapes were recorded with Scenic at commit ``SCENIC_COMMIT``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SCENIC_COMMIT = "4a38d475ee89cb821078c0e2bf2065ee030e1535"
OUT = Path(__file__).resolve().parent.parent / "tests" / "scenic_factorised_shapes.json"

TINY = {"hidden_size": 16, "num_heads": 2, "mlp_dim": 32, "num_layers": 2, "patch": (8, 8, 2)}
BASE = {
    "hidden_size": 768,
    "num_heads": 12,
    "mlp_dim": 3072,
    "num_layers": 12,
    "patch": (16, 16, 2),
}

# (name, attention type, attention order, sizes, representation size, frames, image size)
CASES = [
    ("model3_time_space_tiny", "factorized_self_attention_block", "time_space", TINY, None, 4, 32),
    (
        "model3_space_time_tiny_rep",
        "factorized_self_attention_block",
        "space_time",
        TINY,
        12,
        4,
        32,
    ),
    ("model4_tiny", "factorized_dot_product_attention", None, TINY, None, 4, 32),
    ("model4_tiny_rep", "factorized_dot_product_attention", None, TINY, 12, 4, 32),
    ("model3_base_k400", "factorized_self_attention_block", "time_space", BASE, None, 32, 224),
    ("model4_base_k400", "factorized_dot_product_attention", None, BASE, None, 32, 224),
]
NUM_CLASSES = 10


def scenic_fields(kind: str, order: str | None, sizes: dict, representation: int | None) -> dict:
    """The ``model`` block of a Scenic ViViT config for one case (plain values)."""
    attention = {"type": kind}
    if order is not None:
        attention["attention_order"] = order
    return {
        "attention_config": attention,
        "hidden_size": sizes["hidden_size"],
        "num_heads": sizes["num_heads"],
        "mlp_dim": sizes["mlp_dim"],
        "num_layers": sizes["num_layers"],
        "patches": {"size": list(sizes["patch"])},
        "classifier": "gap",
        "representation_size": representation,
        "temporal_encoding_config": {"method": "3d_conv"},
        "dropout_rate": 0.0,
        "attention_dropout_rate": 0.0,
    }


def record_case(model_fields: dict, frames: int, size: int) -> dict[str, list[int]]:
    """Every parameter path (``a/b/c``) of Scenic's module for the case, and its shape."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    from flax import traverse_util
    from scenic.projects.vivit import model as vivit_model

    config = ml_collections.ConfigDict(
        {"model_name": "vivit_classification", "model": model_fields, "model_dtype_str": "float32"}
    )
    config.model.patches.size = tuple(config.model.patches.size)
    meta = {"num_classes": NUM_CLASSES, "input_shape": (-1, frames, size, size, 3)}
    module = vivit_model.ViViTClassificationModel(config, meta).flax_model
    video = jax.ShapeDtypeStruct((1, frames, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda v: module.init(jax.random.PRNGKey(0), v, train=False), video)
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    return {path: list(leaf.shape) for path, leaf in sorted(flat.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    cases = []
    for name, kind, order, sizes, representation, frames, size in CASES:
        fields = scenic_fields(kind, order, sizes, representation)
        params = record_case(fields, frames, size)
        cases.append(
            {
                "name": name,
                "model": fields,
                "num_classes": NUM_CLASSES,
                "num_frames": frames,
                "image_size": size,
                "params": params,
            }
        )
        print(f"{name}: {len(params)} parameters")
    record = {"scenic_commit": SCENIC_COMMIT, "recorded_by": Path(__file__).name, "cases": cases}
    text = json.dumps(record, indent=1)
    # One line per shape: a list of ints on one line.
    text = re.sub(r"\[\n\s*([\d\s,]*?)\n\s*\]", lambda m: f"[{' '.join(m.group(1).split())}]", text)
    args.out.write_text(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
