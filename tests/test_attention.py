"""Every attention backend available on the CPU against plain attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtm_jax.errors import UserError
from vtm_jax.models.attention import (
    blockwise_attention,
    get_attention,
    jax_nn_attention,
    pallas_block_size,
    pallas_tpu_attention,
    xla_attention,
)


@pytest.mark.parametrize("n, chunk", [(37, 8), (64, 16), (10, 128)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_blockwise_matches_plain(n, chunk, with_bias):
    kq, kk, kv, kb = jax.random.split(jax.random.PRNGKey(n), 4)
    shape = (2, n, 3, 16)
    q, k, v = (jax.random.normal(key, shape) for key in (kq, kk, kv))
    bias = None
    if with_bias:  # proportional attention: log(size) of the keys
        bias = jnp.log(jax.random.randint(kb, (2, 1, 1, n), 1, 9).astype(jnp.float32))
    expected = xla_attention(q, k, v, bias=bias)
    got = blockwise_attention(q, k, v, bias=bias, chunk_size=chunk)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_blockwise_full_bias_rows():
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 21, 2, 8)) for i in range(3))
    bias = jax.random.normal(jax.random.PRNGKey(9), (1, 2, 21, 21))
    np.testing.assert_allclose(
        blockwise_attention(q, k, v, bias=bias, chunk_size=4),
        xla_attention(q, k, v, bias=bias),
        rtol=1e-5,
        atol=1e-5,
    )


def test_blockwise_per_head_key_bias_and_batch():
    # a [1, H, 1, N] bias (one row per head) over two clips: every (head, clip) pair its row
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 45, 3, 8)) for i in range(3))
    bias = jax.random.normal(jax.random.PRNGKey(7), (1, 3, 1, 45))
    np.testing.assert_allclose(
        blockwise_attention(q, k, v, bias=bias, chunk_size=16),
        xla_attention(q, k, v, bias=bias),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("bias_kind", [None, "key", "full"])
def test_blockwise_more_queries_than_keys(bias_kind):
    # Motionformer: every patch query against the keys of one slot (Nq != Nk)
    q, k, v = _qkv(2, 50, 13, 3, 8)
    kb = jax.random.PRNGKey(4)
    bias = {
        None: None,
        "key": jax.random.normal(kb, (2, 1, 1, 13)),
        "full": jax.random.normal(kb, (2, 3, 50, 13)),
    }[bias_kind]
    np.testing.assert_allclose(
        blockwise_attention(q, k, v, bias=bias, chunk_size=16),
        xla_attention(q, k, v, bias=bias),
        rtol=1e-5,
        atol=1e-5,
    )


def test_blockwise_bfloat16_matmuls_are_an_option():
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 300, 2, 64)) for i in range(3))
    bias = jnp.log(jax.random.randint(jax.random.PRNGKey(3), (1, 1, 1, 300), 1, 9) * 1.0)
    expected = xla_attention(q, k, v, bias=bias)
    got = blockwise_attention(q, k, v, bias=bias, chunk_size=64, compute_dtype=jnp.bfloat16)
    assert got.dtype == jnp.float32
    error = float(jnp.max(jnp.abs(got - expected)))
    assert 1e-5 < error < 2e-2  # bfloat16 inputs: visibly not float32, still close
    assert get_attention("blockwise_bf16").keywords == {"compute_dtype": jnp.bfloat16}


@pytest.mark.parametrize("with_bias", [False, True])
def test_jax_nn_matches_plain(with_bias):
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 33, 4, 16)) for i in range(3))
    bias = jnp.log(jnp.arange(1, 34, dtype=jnp.float32))[None, None, None] if with_bias else None
    np.testing.assert_allclose(
        jax_nn_attention(q, k, v, bias=bias),
        xla_attention(q, k, v, bias=bias),
        rtol=1e-5,
        atol=1e-5,
    )


def test_backend_choice():
    assert get_attention("auto") is blockwise_attention  # the CPU default
    with pytest.raises(
        UserError, match="valid: auto, xla, blockwise, blockwise_bf16, jax_nn, cudnn, pallas_tpu"
    ):
        get_attention("flash9")
    with pytest.raises(UserError, match="needs a GPU"):
        get_attention("cudnn")
    with pytest.raises(UserError, match="needs a TPU; this is cpu"):
        get_attention("pallas_tpu")
    q = jnp.zeros((1, 130, 1, 8))
    with pytest.raises(UserError, match="needs a TPU"):  # only the interpreter runs it here
        pallas_tpu_attention(q, q, q)


def test_pallas_block_size():
    assert [pallas_block_size(n) for n in (1, 128, 197, 1536, 1568, 2837, 3137)] == [
        128,
        128,
        256,
        512,
        128,
        512,
        256,
    ]


def _qkv(b, nq, nk, h, d, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return tuple(
        jax.random.normal(key, (b, n, h, d)) for key, n in zip(keys, (nq, nk, nk), strict=True)
    )


# The TPU kernel itself, run by Pallas's TPU interpreter on the CPU (jax>=0.7 ships it).
@pytest.mark.parametrize(
    "nq, nk, bias_kind",
    [
        (137, 137, None),  # padded to 256: two 128-blocks of keys, masked by segment ids
        (137, 137, "key"),  # log(size) folded into an extra head-dim column
        (130, 200, "key_per_head"),  # Nq != Nk, a [B, H, 1, Nk] bias
        (137, 137, "full"),  # a [B, H, Nq, Nk] bias: the kernel's own ab
        (256, 256, None),  # no padding, no mask
    ],
)
def test_pallas_tpu_interpret_matches_plain(nq, nk, bias_kind):
    b, h, d = (2 if bias_kind == "key" else 1), 2, 16  # the key bias differs per clip
    q, k, v = _qkv(b, nq, nk, h, d, seed=nq + nk)
    kb = jax.random.PRNGKey(7)
    bias = {
        None: None,
        "key": jnp.log(jax.random.randint(kb, (b, 1, 1, nk), 1, 9).astype(jnp.float32)),
        "key_per_head": jnp.log(jax.random.randint(kb, (1, h, 1, nk), 1, 9).astype(jnp.float32)),
        "full": jax.random.normal(kb, (b, h, nq, nk)),
    }[bias_kind]
    got = pallas_tpu_attention(q, k, v, bias=bias, block_size=128, interpret=True)
    assert got.shape == (b, nq, h, d)
    np.testing.assert_allclose(got, xla_attention(q, k, v, bias=bias), rtol=1e-5, atol=1e-5)


def test_pallas_tpu_interpret_single_block_and_short_fallback():
    q, k, v = _qkv(1, 37, 37, 2, 8)
    bias = jnp.log(jnp.arange(1, 38, dtype=jnp.float32))[None, None, None]
    expected = xla_attention(q, k, v, bias=bias)
    # min_len=0: one 128-token block, the kernel's single-step path
    got = pallas_tpu_attention(q, k, v, bias=bias, min_len=0, interpret=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # default: shorter than one block goes to plain attention
    np.testing.assert_allclose(pallas_tpu_attention(q, k, v, bias=bias, interpret=True), expected)
