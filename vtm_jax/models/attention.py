"""Dot-product attention with an optional additive key bias, behind one signature.

Every backend takes ``q, k, v`` as ``[B, N, H, d]`` (Flax's layout) and an optional ``bias``
broadcastable to ``[B, H, Nq, Nk]``; proportional attention passes ``log(size)`` of the keys as
``[B, 1, 1, Nk]``. Models receive the function, so a new backend never touches a model.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vtm_jax import plugins
from vtm_jax.errors import UserError
from vtm_jax.models.kernel_inputs import even_tokens, fold_key_bias, round_up

AttentionFn = Callable[..., jax.Array]


def xla_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None
) -> jax.Array:
    """Plain attention: materialises the ``[B, H, N, N]`` logits.

    The logits and softmax are float32 whatever the inputs' dtype (bfloat16 ones accumulate
    into float32), as in the other backends; the weights meet ``v`` in its dtype.
    """
    scaled = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", scaled, k, preferred_element_type=logits_dtype)
    if bias is not None:
        logits = logits + bias
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    chunk_size: int = 256,
    compute_dtype: jnp.dtype | None = None,
) -> jax.Array:
    """Attention computed one (head, clip) pair and ``chunk_size`` queries at a time.

    Each chunk sees every key, so its softmax is exact; only a ``[chunk, N]`` slice of logits
    exists at once (3.2 MB at 3137 tokens), so it stays in cache between the logits matmul,
    the softmax and the values matmul. 256 queries were the fastest chunk at every token
    count of ViViT-B's r=300 schedule (737 to 3137) among 128, 256 and 512. On a CPU this is several times faster than
    :func:`xla_attention` at thousands of tokens (``scripts/bench_attention.py``).

    The layout is chosen for XLA's CPU backend (BENCHMARKS.md lists what each step bought):

    * two nested loops, (head, clip) pairs outside and query chunks inside, so that a pair's
      keys ``[d, N]`` (transposed once, a plain matmul per chunk) and values ``[N, d]`` are
      sliced once per pair rather than copied again for every chunk;
    * the softmax is normalised after the values matmul, ``(exp(s - max) @ v) / sum``: the
      division runs on ``[chunk, d]`` instead of ``[chunk, N]``;
    * a key bias (``log(size)``, ``[B|1, 1, 1, N]``) is one row added to the logits, which XLA
      fuses with the logits matmul, the row maximum and the exponential.

    ``compute_dtype`` (e.g. ``jnp.bfloat16``) runs both matmuls with inputs in that dtype and
    float32 accumulation; the logits' softmax and the output stay float32. It is an option,
    never a default: BENCHMARKS.md gives its speed and its effect on a model's logits.
    """
    b, n, h, d = q.shape
    if n <= chunk_size:
        return xla_attention(q, k, v, bias=bias)
    # As many chunks as chunk_size needs, made equal (a multiple of 8 queries): padded queries
    # are wasted work, e.g. 1337 tokens in 6 chunks of 224 instead of 6 of 256 (15% padding).
    num_chunks = -(-n // chunk_size)
    chunk_size = round_up(-(-n // num_chunks), 8)
    xs = _pair_major(q, k, v, num_chunks, chunk_size, compute_dtype)
    # a key bias ([..., 1, Nk], proportional attention's) stays one row per pair
    key_bias = bias is not None and (jnp.ndim(bias) < 2 or jnp.shape(bias)[-2] == 1)
    if bias is not None:
        xs += (_pair_major_bias(bias, b, h, n, k.shape[1], num_chunks, chunk_size),)

    def one_pair(args):
        q_pair, k_pair, v_pair = args[:3]
        pair_bias = args[3] if len(args) > 3 else None
        if pair_bias is None or key_bias:
            return jax.lax.map(lambda qc: _chunk_attention(qc, k_pair, v_pair, pair_bias), q_pair)
        return jax.lax.map(
            lambda a: _chunk_attention(a[0], k_pair, v_pair, a[1]), (q_pair, pair_bias)
        )

    out = jax.lax.map(one_pair, xs)  # [H*B, chunks, chunk, d]
    out = out.reshape(h, b, num_chunks * chunk_size, d)[:, :, :n].astype(q.dtype)
    return jnp.transpose(out, (1, 2, 0, 3))


def _pair_major(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    num_chunks: int,
    chunk_size: int,
    compute_dtype: jnp.dtype | None,
) -> tuple[jax.Array, ...]:
    """Scaled queries ``[H*B, chunks, chunk, d]`` (zero-padded), keys transposed ``[H*B, d, Nk]``
    and values ``[H*B, Nk, d]``: (head, clip) pairs first."""
    b, n, h, d = q.shape
    nk = k.shape[1]  # keys may differ in number from queries (Motionformer's slots)
    pad = num_chunks * chunk_size - n
    scale = 1.0 / jnp.sqrt(d).astype(q.dtype)
    qh = jnp.pad(jnp.transpose(q * scale, (2, 0, 1, 3)), ((0, 0), (0, 0), (0, pad), (0, 0)))
    qh = qh.reshape(h * b, num_chunks, chunk_size, d)
    kt = jnp.transpose(k, (2, 0, 3, 1)).reshape(h * b, d, nk)
    vh = jnp.transpose(v, (2, 0, 1, 3)).reshape(h * b, nk, d)
    if compute_dtype is not None:
        qh, kt, vh = (x.astype(compute_dtype) for x in (qh, kt, vh))
    return qh, kt, vh


def _pair_major_bias(
    bias: jax.Array, b: int, h: int, n: int, nk: int, num_chunks: int, chunk_size: int
) -> jax.Array:
    """The bias in the pairs' layout, float32: a key bias stays one row per pair,
    ``[H*B, 1, Nk]``; a bias per query and key becomes ``[H*B, chunks, chunk, Nk]``."""
    bias = jnp.reshape(bias, (1,) * (4 - bias.ndim) + bias.shape)
    if bias.shape[2] == 1:
        row = jnp.broadcast_to(bias, (b, h, 1, nk)).astype(jnp.float32)
        return jnp.transpose(row, (1, 0, 2, 3)).reshape(h * b, 1, nk)
    pad = num_chunks * chunk_size - n
    full = jnp.broadcast_to(bias, (b, h, n, nk)).astype(jnp.float32)
    full = jnp.pad(jnp.transpose(full, (1, 0, 2, 3)), ((0, 0), (0, 0), (0, pad), (0, 0)))
    return full.reshape(h * b, num_chunks, chunk_size, nk)


def _chunk_attention(
    q_chunk: jax.Array, k_pair: jax.Array, v_pair: jax.Array, bias: jax.Array | None
) -> jax.Array:
    """One query chunk against all of its pair's keys; normalised after the values matmul."""
    logits = jnp.dot(q_chunk, k_pair, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.dot(weights.astype(v_pair.dtype), v_pair, preferred_element_type=jnp.float32)
    return out / total


def jax_nn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """``jax.nn.dot_product_attention`` with ``implementation`` left to JAX.

    In JAX 0.10 ``implementation=None`` is XLA's own attention on every platform (JAX's source
    says it does not pick cuDNN automatically yet); :func:`cudnn_attention` asks for cuDNN.
    """
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    compute_dtype: jnp.dtype = jnp.float16,
    implementation: str = "cudnn",
) -> jax.Array:
    """cuDNN's fused attention (``jax.nn.dot_product_attention(implementation="cudnn")``).

    cuDNN's kernel takes only fp16, bf16 or fp8 inputs, so float32 ``q, k, v`` are cast to
    ``compute_dtype`` and the output is cast back: this backend is never float32 inside.
    float16 is the default because it keeps 3 more mantissa bits than bfloat16 (the
    ``log(size)`` bias, up to about 8, is then off by at most 0.004) and ViT activations stay
    far below its 65504 limit. The lowering needs cuDNN on the machine (JAX asks it for its
    version while tracing).

    A key bias (``[B|1, H|1, 1, Nk]``, proportional attention's ``log(size)``) is folded into
    the head dim (``kernel_inputs.fold_key_bias``, padded to cuDNN's multiple of 8: 64 -> 72)
    and the kernel runs without a bias: cuDNN's bias must be a whole ``[B|1, H|1, Nq, Nk]``
    (20 MB per clip in float16 at 3137 tokens). A head dim whose fold would pass 128 (cuDNN's
    limit before Hopper) and any other bias take the kernel's own bias, broadcast to
    ``Nq x Nk``. Odd token counts get one zero row more (``kernel_inputs.even_tokens``): JAX
    0.10's cuDNN training rule refuses them. ``implementation="xla"`` runs the same inputs
    through JAX's reference attention instead (tests on machines without a GPU).
    """
    dtype = q.dtype
    if dtype not in (jnp.float16, jnp.bfloat16):
        q, k, v = (x.astype(compute_dtype) for x in (q, k, v))
    b, nq, h, d = q.shape
    nk = k.shape[1]
    scale = None  # the kernel's own, 1/sqrt(d)
    if bias is not None:
        bias = jnp.reshape(bias, (1,) * (4 - bias.ndim) + bias.shape)
    if bias is not None and bias.shape[2] == 1 and round_up(d + 1, 8) <= 128:
        column = jnp.transpose(jnp.broadcast_to(bias[:, :, 0], (b, h, nk)), (0, 2, 1))
        scaled = q * (1.0 / d**0.5)  # the scale on q alone, not on the bias column
        q, k, v = fold_key_bias(scaled, k, v, column.astype(q.dtype), multiple=8)
        bias, scale = None, 1.0
    elif bias is not None:
        bias = jnp.broadcast_to(bias, bias.shape[:2] + (nq, nk)).astype(q.dtype)
    q, k, v, bias, lengths = even_tokens(q, k, v, bias)
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        bias=bias,
        scale=scale,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )
    return out[:, :nq, :, :d].astype(dtype)


def pallas_block_size(n: int) -> int:
    """The flash kernel's tile for a sequence of ``n``: 512, 256 or 128 tokens.

    Blocks are multiples of 128 (the kernel's lane width) and the sequence is padded to one;
    the larger tile (fewer grid steps) is taken while its padding costs at most 1/16 more than
    padding to 128, e.g. 3137 tokens: 256 (3328 padded), 2837: 512 (3072 padded).
    """
    base = round_up(n, 128)
    for block in (512, 256):
        if round_up(n, block) * 16 <= base * 17:
            return block
    return 128


def pallas_tpu_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    block_size: int | None = None,
    min_len: int = 128,
    interpret: bool = False,
    require_tpu: bool = True,
) -> jax.Array:
    """JAX's Pallas flash-attention kernel for TPUs (``pallas.ops.tpu.flash_attention``).

    The kernel wants ``[B, H, N, d]``, sequence lengths divisible by its blocks and a bias
    ``ab`` of exactly ``[B, H, Nq, Nk]``; it adds ``ab`` before multiplying by ``sm_scale``, so
    ``q`` is scaled by ``1/sqrt(d)`` here (``sm_scale=1``), as in the other backends. Queries
    and keys are zero-padded to the block (``block_size``, default :func:`pallas_block_size`);
    padded queries are sliced off and padded keys masked out.

    A key bias (``[B|1, H|1, 1, Nk]``, proportional attention's ``log(size)``) is not expanded
    to ``[B, H, Nq, Nk]`` (470 MB per clip in f32 at 3137 tokens and 12 heads): it becomes an
    extra head-dim column (``kernel_inputs.fold_key_bias``), ``q' = [q/sqrt(d), 1]``,
    ``k' = [k, bias]``, ``v' = [v, 0]``, the head dim padded to a multiple of 128 (64 -> 128),
    and no ``ab``; padded keys get a large negative entry there. Any other bias is expanded
    and padded to ``[B, H, Nq, Nk]`` and passed as ``ab`` (that memory cost applies). Without a
    bias, padded keys are masked with the kernel's segment ids.

    Sequences shorter than ``min_len`` (TimeSformer's 8 temporal tokens, a single class query)
    go to :func:`xla_attention`: padding them to a 128-token block wastes more than it saves.
    ``interpret=True`` runs the kernel in Pallas's TPU interpreter on any platform (tests); it
    covers the forward pass, a gradient must be traced under ``pltpu.force_tpu_interpret_mode``.
    ``require_tpu=False`` lets a machine without a TPU trace the kernel for another one
    (``jax.export`` with ``platforms=["tpu"]``); running it there fails in Pallas.
    """
    if require_tpu and not interpret and jax.default_backend() != "tpu":
        raise UserError(
            f"attention backend 'pallas_tpu' needs a TPU; this is {jax.default_backend()}"
        )
    b, nq, h, d = q.shape
    nk = k.shape[1]
    if min(nq, nk) < min_len:
        return xla_attention(q, k, v, bias=bias)
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    block_q = block_size or pallas_block_size(nq)
    block_k = block_size or pallas_block_size(nk)
    nq_pad, nk_pad = round_up(nq, block_q), round_up(nk, block_k)
    mask_value = -0.5 * float(jnp.finfo(q.dtype).max)

    def heads_first(x: jax.Array, n_pad: int) -> jax.Array:
        x = jnp.transpose(x, (0, 2, 1, 3))  # [B, H, N, d], zero rows up to n_pad
        return jnp.pad(x, ((0, 0), (0, 0), (0, n_pad - x.shape[2]), (0, 0)))

    qt = heads_first(q / jnp.sqrt(d).astype(q.dtype), nq_pad)
    kt, vt = heads_first(k, nk_pad), heads_first(v, nk_pad)
    ab = segment_ids = None
    if bias is not None:
        bias = jnp.reshape(bias, (1,) * (4 - bias.ndim) + bias.shape)
    if bias is not None and bias.shape[2] == 1:  # a key bias: one more head-dim column
        column = jnp.broadcast_to(bias[:, :, 0], (b, h, nk)).astype(qt.dtype)
        column = jnp.pad(column, ((0, 0), (0, 0), (0, nk_pad - nk)), constant_values=mask_value)
        qt, kt, vt = fold_key_bias(qt, kt, vt, column, multiple=128)
    elif bias is not None:  # a bias per query and key: the kernel's full [B, H, Nq, Nk] ab
        ab = jnp.broadcast_to(bias, (b, h, nq, nk)).astype(jnp.float32)
        ab = jnp.pad(ab, ((0, 0), (0, 0), (0, nq_pad - nq), (0, 0)))
        ab = jnp.pad(ab, ((0, 0), (0, 0), (0, 0), (0, nk_pad - nk)), constant_values=mask_value)
    elif nk_pad != nk:  # no bias: padded keys get segment 0, every query segment 1
        q_ids = jnp.ones((b, nq_pad), jnp.int32)
        kv_ids = jnp.broadcast_to((jnp.arange(nk_pad) < nk).astype(jnp.int32), (b, nk_pad))
        segment_ids = fa.SegmentIds(q=q_ids, kv=kv_ids)
    blocks = _flash_block_sizes(fa, block_q, block_k)
    with pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext():
        out = fa.flash_attention(qt, kt, vt, ab, segment_ids, sm_scale=1.0, block_sizes=blocks)
    return jnp.transpose(out[:, :, :nq, :d], (0, 2, 1, 3))


def _flash_block_sizes(fa: Any, block_q: int, block_k: int) -> Any:
    """The flash kernel's tiles, the backward pass's too, so that gradients run."""
    return fa.BlockSizes(
        block_q=block_q,
        block_k_major=block_k,
        block_k=block_k,
        block_b=1,
        block_q_major_dkv=block_q,
        block_k_major_dkv=block_k,
        block_k_dkv=block_k,
        block_q_dkv=block_q,
        block_k_major_dq=block_k,
        block_k_dq=block_k,
        block_q_dq=block_q,
    )


BACKENDS: dict[str, AttentionFn] = {
    "xla": xla_attention,
    "blockwise": blockwise_attention,
    # bfloat16 matmul inputs, float32 softmax and accumulation: an opt-in CPU speed option
    "blockwise_bf16": functools.partial(blockwise_attention, compute_dtype=jnp.bfloat16),
    "jax_nn": jax_nn_attention,  # XLA's attention (JAX 0.10 does not choose cuDNN by itself)
    "cudnn": cudnn_attention,
    "pallas_tpu": pallas_tpu_attention,
}
NEEDS_PLATFORM = {"cudnn": "gpu", "pallas_tpu": "tpu"}
# what ``auto`` picks on each platform (``jax.default_backend()``); ``xla`` elsewhere
AUTO_BACKENDS = {"cpu": "blockwise", "gpu": "jax_nn", "tpu": "pallas_tpu"}


def register_attention(
    name: str, fn: AttentionFn, *, platform: str | None = None, replace: bool = False
) -> AttentionFn:
    """Add an attention backend, selectable as ``get_attention(name)`` or ``--attention name``.

    ``fn(q, k, v, *, bias=None)`` takes ``[B, N, H, d]`` queries, keys and values and an
    optional additive logit bias broadcastable to ``[B, H, Nq, Nk]``, and returns
    ``[B, Nq, H, d]``; it must be jit-traceable. ``platform`` (``gpu``, ``tpu``) makes
    :func:`get_attention` refuse it elsewhere. Registering the same function twice is a no-op;
    another under a taken name needs ``replace=True``. Returns ``fn``.
    """
    if not callable(fn):
        raise TypeError(f"an attention backend must be callable, not {type(fn).__name__}")
    if name == "auto":
        raise ValueError("'auto' picks a backend by platform; register under another name")
    plugins.check_name(BACKENDS, name, fn, replace=replace)
    BACKENDS[name] = fn
    if platform is None:
        NEEDS_PLATFORM.pop(name, None)
    else:
        NEEDS_PLATFORM[name] = platform
    return fn


def get_attention(name: str = "auto", *, chunk_size: int | None = None) -> AttentionFn:
    """The attention function for a backend name.

    ``auto``: ``blockwise`` on CPUs (materialising the logits is the bottleneck there),
    ``jax_nn`` on GPUs (XLA's attention in the model's dtype; ``cudnn``, fused but float16
    inside, only by name), ``pallas_tpu`` on TPUs
    (Pallas flash attention), ``xla`` elsewhere. ``blockwise_bf16`` is ``blockwise`` with
    bfloat16 matmul inputs: faster on CPUs with AVX-512 BF16 or AMX, never chosen by ``auto``.
    """
    platform = jax.default_backend()
    if name == "auto":
        name = AUTO_BACKENDS.get(platform, "xla")
    if name not in BACKENDS:
        raise UserError(f"unknown attention backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    needs = NEEDS_PLATFORM.get(name)
    if needs is not None and platform != needs:
        raise UserError(f"attention backend {name!r} needs a {needs.upper()}; this is {platform}")
    fn = BACKENDS[name]
    if chunk_size is not None and name in ("blockwise", "blockwise_bf16"):
        fn = functools.partial(fn, chunk_size=chunk_size)
    return fn
