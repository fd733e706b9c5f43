"""Every attention backend available on the CPU against plain attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtm_jax.attention import blockwise_attention, get_attention, jax_nn_attention, xla_attention
from vtm_jax.errors import UserError


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
    with pytest.raises(UserError, match="valid: auto, xla, blockwise, jax_nn, cudnn"):
        get_attention("flash9")
    with pytest.raises(UserError, match="needs a GPU"):
        get_attention("cudnn")
