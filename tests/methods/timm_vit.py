"""A timm ViT's weights (saved by a fixture script under timm's names) in vtm-jax's ViViT tree.

The authors' reference models of PiToMe and ToFu are timm 0.4.12 ``VisionTransformer``s: a
class token, learned positions, pre-LN blocks with a fused ``qkv``, exact GELU. A ViViT with a
single-frame tubelet ``(1, p, p)`` and ``gelu_approximate=False`` is the same network; the
names map as the converters in ``vtm_jax/checkpoints/convert`` map theirs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vtm_jax.checkpoints.convert.common import (
    CONV,
    IDENTITY,
    LINEAR,
    OUT_KERNEL,
    QKV_BIAS,
    QKV_KERNEL,
    flatten,
    map_tensors,
)
from vtm_jax.models.encoder import EncoderBlock
from vtm_jax.models.vivit import ViViT

_ATTN = "MultiHeadDotProductAttention_0"
_QKV = tuple(f"{_ATTN}/{p}" for p in ("query", "key", "value"))


def block_table(timm_prefix: str, ours: str) -> dict:
    """One block's timm names -> (Flax path(s), layout)."""
    table = {
        "norm1.weight": ("LayerNorm_0/scale", IDENTITY),
        "norm1.bias": ("LayerNorm_0/bias", IDENTITY),
        "attn.qkv.weight": (tuple(f"{p}/kernel" for p in _QKV), QKV_KERNEL),
        "attn.qkv.bias": (tuple(f"{p}/bias" for p in _QKV), QKV_BIAS),
        "attn.proj.weight": (f"{_ATTN}/out/kernel", OUT_KERNEL),
        "attn.proj.bias": (f"{_ATTN}/out/bias", IDENTITY),
        "norm2.weight": ("LayerNorm_1/scale", IDENTITY),
        "norm2.bias": ("LayerNorm_1/bias", IDENTITY),
        "mlp.fc1.weight": ("MlpBlock_0/Dense_0/kernel", LINEAR),
        "mlp.fc1.bias": ("MlpBlock_0/Dense_0/bias", IDENTITY),
        "mlp.fc2.weight": ("MlpBlock_0/Dense_1/kernel", LINEAR),
        "mlp.fc2.bias": ("MlpBlock_0/Dense_1/bias", IDENTITY),
    }
    out = {}
    for name, (paths, kind) in table.items():
        paths = tuple(f"{ours}{p}" for p in paths) if isinstance(paths, tuple) else ours + paths
        out[f"{timm_prefix}{name}"] = (paths, kind)
    return out


def _weights(data: dict, prefix: str = "") -> dict[str, np.ndarray]:
    state = {k[2:]: v for k, v in data.items() if k.startswith(f"w/{prefix}")}
    if "patch_embed.proj.weight" in state:  # a 2-D conv is a 3-D one over a single frame
        state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"][:, :, None]
    return state


def _shapes(module, *args, **kwargs) -> dict[str, tuple[int, ...]]:
    tree = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))
    return {k: v.shape for k, v in flatten(tree["params"]).items()}


def vivit_params(data: dict, model: ViViT, video: jax.Array) -> dict:
    """The ViViT parameters of the timm model whose weights ``data`` holds."""
    table = {
        "cls_token": ("cls", IDENTITY),
        "pos_embed": ("Transformer/posembed_input/pos_embedding", IDENTITY),
        "patch_embed.proj.weight": ("embedding/kernel", CONV),
        "patch_embed.proj.bias": ("embedding/bias", IDENTITY),
        "norm.weight": ("Transformer/encoder_norm/scale", IDENTITY),
        "norm.bias": ("Transformer/encoder_norm/bias", IDENTITY),
        "head.weight": ("output_projection/kernel", LINEAR),
        "head.bias": ("output_projection/bias", IDENTITY),
    }
    for i in range(model.num_layers):
        table |= block_table(f"blocks.{i}.", f"Transformer/encoderblock_{i}/")
    return map_tensors(_weights(data), table, _shapes(model, video), "timm ViT")


def block_params(data: dict, block: EncoderBlock, layer: int, x: jax.Array) -> dict:
    """The parameters of timm block ``layer`` for an EncoderBlock."""
    from vtm_jax.merging import Tokens

    shapes = _shapes(block, Tokens(x), None, r=0)
    table = block_table(f"blocks.{layer}.", "")
    return map_tensors(_weights(data, f"blocks.{layer}."), table, shapes, "timm block")


def video(images: np.ndarray) -> jax.Array:
    """timm's ``[B, 3, H, W]`` images as a one-frame ViViT video ``[B, 1, H, W, 3]``."""
    return jnp.asarray(images.transpose(0, 2, 3, 1)[:, None])


def random_params(model, video: jax.Array) -> dict:
    """Random parameters from the model's shapes alone (no init to compile)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), video)["params"]
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: (path[-1].key == "scale") + 0.2 * rng.standard_normal(s.shape, np.float32),
        shapes,
    )
