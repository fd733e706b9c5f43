"""Proportional attention folded into the keys: exact on the CPU, no ``Nq x Nk`` when lowered.

``s q.k + log(size_k) = [s q, 1] . [k, log(size_k)]`` lets a fused kernel without a bias run
proportional attention (``models.attention.fold_key_bias``). Here the folded inputs go through
JAX's reference attention and the Pallas kernel's own reference, and the cuDNN and Pallas
backends are lowered for their accelerators (``jax.export``) to show that no operand has both
the query and the key count among its dimensions.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
from jax._src.lib import cuda_versions
from jax.experimental.pallas.ops.tpu import flash_attention as fa

from vtm_jax.models.attention import (
    cudnn_attention,
    jax_nn_attention,
    pallas_block_size,
    pallas_tpu_attention,
    xla_attention,
)
from vtm_jax.models.kernel_inputs import fold_key_bias

TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(b, nq, nk, h, d, bias_shape, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v = (
        jax.random.normal(key, (b, n, h, d)) for key, n in zip(keys[:3], (nq, nk, nk), strict=True)
    )
    sizes = jax.random.randint(keys[3], bias_shape, 1, 30).astype(jnp.float32)
    return q, k, v, jnp.log(sizes)


def _column(bias, b, h, nk):
    """A ``[B|1, H|1, 1, Nk]`` key bias as ``k``'s shape without its head dim, ``[B, Nk, H]``."""
    return jnp.transpose(jnp.broadcast_to(bias[:, :, 0], (b, h, nk)), (0, 2, 1))


@pytest.mark.parametrize(
    "nq, nk, bias_shape, multiple",  # cuDNN's alignment (8) and the Pallas kernel's (128)
    [(37, 37, (2, 1, 1, 37), 8), (50, 13, (2, 1, 1, 13), 128), (21, 21, (1, 3, 1, 21), 8)],
)
def test_folded_keys_equal_the_biased_attention(nq, nk, bias_shape, multiple):
    b, h, d = 2, 3, 16
    q, k, v, bias = _inputs(b, nq, nk, h, d, bias_shape)
    expected = xla_attention(q, k, v, bias=bias)
    fold = jax.jit(functools.partial(fold_key_bias, multiple=multiple))
    qf, kf, vf = fold(q / d**0.5, k, v, _column(bias, b, h, nk))
    assert qf.shape[-1] == kf.shape[-1] == vf.shape[-1] == -(-(d + 1) // multiple) * multiple
    # JAX's reference for the fused kernels (what implementation="cudnn" computes)
    got = jax.jit(functools.partial(jax.nn.dot_product_attention, scale=1.0))(qf, kf, vf)
    np.testing.assert_allclose(got[..., :d], expected, **TOL)
    np.testing.assert_array_equal(got[..., d:], 0.0)  # the padded value columns stay zero
    # the Pallas TPU kernel's own reference, in its [B, H, N, d] layout, without an ab
    heads_first = functools.partial(jnp.transpose, axes=(0, 2, 1, 3))
    ref = jax.jit(fa.mha_reference_no_custom_vjp)(*map(heads_first, (qf, kf, vf)), None)
    np.testing.assert_allclose(heads_first(ref)[..., :d], expected, **TOL)


@pytest.mark.parametrize(
    "nq, nk, bias_shape",
    # odd counts are padded to even ones, the padded keys masked by their count
    [(33, 33, (2, 1, 1, 33)), (41, 8, (2, 1, 1, 8)), (24, 24, (1, 3, 1, 24)), (25, 25, None)],
)
def test_cudnn_path_matches_reference_and_gradients(nq, nk, bias_shape):
    # the whole cuDNN backend (fold, scale, slice), its kernel swapped for JAX's reference
    b, h, d = 2, 3, 24  # folded to 32
    q, k, v, bias = _inputs(b, nq, nk, h, d, bias_shape or (1, 1, 1, nk), seed=nq + nk)
    bias = None if bias_shape is None else bias
    cudnn_f32 = functools.partial(cudnn_attention, compute_dtype=jnp.float32, implementation="xla")
    got = jax.jit(cudnn_f32)(q, k, v, bias=bias)
    np.testing.assert_allclose(got, xla_attention(q, k, v, bias=bias), **TOL)
    if bias is None:
        return
    weights = jax.random.normal(jax.random.PRNGKey(5), (b, nq, h, d))

    def grads(fn):  # gradients of q, k, v and the bias (through the folded key column)
        loss = lambda q, k, v, bias: jnp.sum(fn(q, k, v, bias=bias) * weights)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)

    for got, expected in zip(grads(cudnn_f32), grads(xla_attention), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_cudnn_path_in_float16_and_wide_heads():
    q, k, v, bias = _inputs(2, 30, 30, 2, 64, (2, 1, 1, 30), seed=3)
    # eager: XLA's CPU backend compiles no float16 matmul with float32 accumulation in a jit
    reference = functools.partial(cudnn_attention, implementation="xla")
    expected = xla_attention(q, k, v, bias=bias)
    got = reference(q, k, v, bias=bias)  # the default: float16 inside, float32 out
    assert got.dtype == jnp.float32
    error = float(jnp.max(jnp.abs(got - expected)))
    assert 1e-5 < error < 5e-3  # float16 inputs and bias: visibly not float32, still close
    # a head dim of 128 would fold to 136, past cuDNN's 128 before Hopper: the kernel's bias
    q, k, v, bias = _inputs(1, 20, 20, 2, 128, (1, 1, 1, 20), seed=4)
    got = jax.jit(functools.partial(reference, compute_dtype=jnp.float32))(q, k, v, bias=bias)
    np.testing.assert_allclose(got, xla_attention(q, k, v, bias=bias), **TOL)


# Lowered for the accelerators: shapes are read from the StableHLO text (tensor<2x200x3x72xf16>).
_SHAPE = re.compile(r"tensor<((?:\d+x)+)[a-z]")
# A CPU jaxlib cannot say which cuDNN is installed; JAX's lowering asks (tests/test_export.py).
PINNED_CUDNN = 91000
_CUDNN_CALLS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")
_CUDNN_CALLS += ("__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward")


@pytest.fixture
def pinned_cudnn(monkeypatch):
    if cuda_versions is None:
        monkeypatch.setattr(cudnn_fa, "check_cudnn_version", lambda: PINNED_CUDNN)


def _lowered(attention, platform, b, nq, nk, h, d) -> str:
    """The StableHLO of the attention and its gradient for ``platform``, float32 in and out."""
    q = jax.ShapeDtypeStruct((b, nq, h, d), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, nk, h, d), jnp.float32)
    bias = jax.ShapeDtypeStruct((b, 1, 1, nk), jnp.float32)

    def forward_and_grads(q, k, v, bias):
        out, vjp = jax.vjp(lambda *a: attention(*a[:3], bias=a[3]), q, k, v, bias)
        return out, vjp(out)

    waived = [export.DisabledSafetyCheck.custom_call(t) for t in _CUDNN_CALLS]
    exported = export.export(
        jax.jit(forward_and_grads), platforms=[platform], disabled_checks=waived
    )(q, kv, kv, bias)
    return exported.mlir_module()


def _query_by_key_shapes(module: str, query_dims: set, key_dims: set) -> list[tuple]:
    """Every shape in ``module`` with a query-count and another, key-count dimension."""
    found = []
    for match in _SHAPE.finditer(module):
        dims = [int(x) for x in match.group(1).rstrip("x").split("x")]
        for i, dim in enumerate(dims):
            rest = dims[:i] + dims[i + 1 :]
            if dim in query_dims and any(other in key_dims for other in rest):
                found.append(tuple(dims))
                break
    return found


def _padded(backend, n):
    """``n`` and the count the backend pads it to (cuDNN: even; Pallas: its blocks)."""
    multiple = pallas_block_size(n) if backend == "pallas_tpu" else 2
    return {n, -(-n // multiple) * multiple}


# backend -> (function, platform, the kernel's call in the module)
_KERNELS = {
    "cudnn": (cudnn_attention, "cuda", "__cudnn$fmhaSoftmaxBackward"),
    "pallas_tpu": (
        functools.partial(pallas_tpu_attention, require_tpu=False),
        "tpu",
        "tpu_custom_call",
    ),
}


# N values no other dimension takes (batch 2, 3 heads, head dim 64, folded 72 or 128), each of
# several Pallas blocks: its backward pass broadcasts a per-query row to [B, H, Nq, block_k]
# (JAX's kernel), which for a single key block would be [B, H, Nq, Nk] padded.
@pytest.mark.parametrize("nq, nk", [(301, 301), (600, 300)])
@pytest.mark.parametrize("backend", list(_KERNELS))
def test_lowered_kernels_hold_no_query_by_key_operand(backend, nq, nk, pinned_cudnn):
    attention, platform, kernel = _KERNELS[backend]
    module = _lowered(attention, platform, 2, nq, nk, 3, 64)
    assert kernel in module  # the fused kernel runs, not a fallback to plain attention
    assert _query_by_key_shapes(module, _padded(backend, nq), _padded(backend, nk)) == []
    if backend == "cudnn":
        assert "fmhaScaleBias" not in module  # cuDNN's bias variant is not called


def test_query_by_key_check_finds_a_materialised_bias(pinned_cudnn):
    # the check sees what the fold removes: XLA's attention and cuDNN's own bias (head dim
    # 128, where the fold would pass cuDNN's limit) both hold [.., 200, 200] arrays
    plain = _lowered(jax_nn_attention, "cuda", 2, 200, 200, 3, 64)
    assert any(shape[-2:] == (200, 200) for shape in _query_by_key_shapes(plain, {200}, {200}))
    wide = _lowered(cudnn_attention, "cuda", 2, 200, 200, 3, 128)
    assert "fmhaScaleBias" in wide
    assert _query_by_key_shapes(wide, {200}, {200})
