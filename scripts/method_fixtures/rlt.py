"""Fixtures for mode ``rlt`` from the authors' own Run-Length Tokenization code.

Repository: https://github.com/rccchoudhury/rlt, commit
69ec8b4b8bf8fc44252108801f095936d9845dba (the code, fetched outside this repository, is imported
from the checkout path given on the command line; nothing of it is copied here).

Run with the reference environment (torch, torchvision with ``transforms.v2``, timm, einops,
ipdb), from the repository root::

    python scripts/method_fixtures/rlt.py /path/to/rlt-checkout

It writes three files to ``tests/methods/fixtures/`` (``--out`` to change), each recording the
repository, the commit and the seeds:

* ``rlt_keep.npz`` (level 1): synthetic clips (static patches copied exactly across frames,
  slowly drifting patches, patches that change, a moving square; every score at least
  ``MARGIN`` from each threshold used, checked here) and, for tubelets 1, 2 and 4 and thresholds
  0.0, 0.1 and 0.5, the keep mask of ``static_token_utils.batched_find_idxs_to_keep`` and the
  pooled scores it thresholds (read by passing a threshold object that records the tensor it is
  compared with, then compares as the float would). Also, from ``Tokenizer.forward`` on the
  whole batch: the kept counts and the position rows ``collate_tokens`` gathers, in its order.
* ``rlt_block.npz`` (level 2): one ``vit_helpers.Block`` with random weights, applied per clip
  to the kept tokens only (what the authors' block-diagonal mask computes), with the full
  token array and the keep masks.
* ``rlt_model.npz`` (level 3): a tiny ``vit_helpers.VisionTransformer`` (VideoMAE-like: q/v
  bias, sine-cosine positions, mean pooling, fc_norm; LayerNorm epsilon 1e-5) with random
  weights, and its logits, each clip run through ``Tokenizer.forward`` and the model alone.

Stubs, because the code imports them but these paths do not use them: ``xformers`` is GPU-only;
its ``BlockDiagonalMask`` is stubbed by a record of the sequence lengths whose ``split`` cuts
the packed sequence by them, and the model runs with ``use_flash_attn=False`` (plain softmax
attention, which ignores the mask), one clip at a time, so attention is exactly per clip.
``timm.layers`` (timm >= 0.9) is aliased to timm 0.4's ``timm.models.layers``, which has the
same three helpers.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import numpy as np
import torch

REPOSITORY = "https://github.com/rccchoudhury/rlt"
COMMIT = "69ec8b4b8bf8fc44252108801f095936d9845dba"
CLIP_SEED, BLOCK_SEED, MODEL_SEED = 0, 1, 2
FRAMES, SIZE, PATCH, CHANNELS = 8, 16, 4, 3
WIDTH, HEADS, DEPTH, CLASSES = 32, 4, 2, 5
THRESHOLDS = (0.0, 0.1, 0.5)
TUBELETS = (1, 2, 4)
MARGIN = 0.02


def install_stubs() -> None:
    """``xformers`` (GPU-only, unused by plain attention) and timm's newer ``timm.layers``."""
    import timm.models.layers

    sys.modules.setdefault("timm.layers", timm.models.layers)

    class BlockDiagonalMask:
        def __init__(self, seqlens):
            self.seqlens = list(seqlens)

        @classmethod
        def from_seqlens(cls, seqlens):
            return cls(seqlens)

        def split(self, x):
            return list(x.split(self.seqlens, dim=1))

    def memory_efficient_attention(*args, **kwargs):
        raise RuntimeError("the xformers stub has no kernel: run with use_flash_attn=False")

    xformers = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    fmha = types.ModuleType("xformers.ops.fmha")
    attn_bias = types.ModuleType("xformers.ops.fmha.attn_bias")
    attn_bias.BlockDiagonalMask = BlockDiagonalMask
    fmha.attn_bias = attn_bias
    fmha.memory_efficient_attention = memory_efficient_attention
    ops.fmha = fmha
    xformers.ops = ops
    for name, module in [
        ("xformers", xformers),
        ("xformers.ops", ops),
        ("xformers.ops.fmha", fmha),
        ("xformers.ops.fmha.attn_bias", attn_bias),
    ]:
        sys.modules[name] = module


class RecordingThreshold:
    """Compares like ``value`` while recording the tensor compared with it (``t > self``)."""

    def __init__(self, value: float):
        self.value = value
        self.seen = None

    def __lt__(self, other):
        self.seen = other.detach().clone()
        return other > self.value


def synthetic_clips(seed: int) -> np.ndarray:
    """``[3, T, H, W, C]`` float32 normalised-looking clips whose scores avoid the thresholds.

    Clip 0: the top half copied exactly frame to frame, the bottom half drifting by small
    noise, one patch column renewed every frame. Clip 1: a static background (exact copies)
    with a bright square moving by a patch each frame. Clip 2: every frame new.
    """
    rng = np.random.default_rng(seed)
    clips = np.empty((3, FRAMES, SIZE, SIZE, CHANNELS), np.float32)
    first = rng.normal(size=(SIZE, SIZE, CHANNELS))
    clips[0, 0] = first
    for f in range(1, FRAMES):
        frame = clips[0, f - 1].copy()
        frame[SIZE // 2 :] += rng.normal(scale=0.004, size=frame[SIZE // 2 :].shape)
        frame[:, PATCH : 2 * PATCH] = rng.normal(size=(SIZE, PATCH, CHANNELS))
        clips[0, f] = frame
    background = rng.normal(size=(SIZE, SIZE, CHANNELS))
    for f in range(FRAMES):
        frame = background.copy()
        row, col = (f // 4) * PATCH, (f % 4) * PATCH
        frame[row : row + PATCH, col : col + PATCH] = 3.0
        clips[1, f] = frame
    clips[2] = rng.normal(size=clips[2].shape)
    return clips


def keep_level(rlt_root: Path, clips: np.ndarray) -> dict[str, np.ndarray]:
    from src.models.static_token_utils import batched_find_idxs_to_keep

    video = torch.from_numpy(clips).permute(0, 4, 1, 2, 3)  # [B, C, T, H, W], as they take
    out: dict[str, np.ndarray] = {}
    for tubelet in TUBELETS:
        for threshold in THRESHOLDS:
            spy = RecordingThreshold(threshold)
            mask = batched_find_idxs_to_keep(video, spy, tubelet, PATCH)
            scores = spy.seen.numpy()
            later = scores[:, 1:]  # the first tubelet holds the dummy 255
            if threshold > 0:
                assert np.abs(later - threshold).min() > MARGIN, (tubelet, threshold)
            else:
                # Exact copies score exactly 0 (dropped); drifting patches score about 1e-2.
                assert ((later == 0) | (later > 1e-3)).all(), (tubelet, threshold)
            name = f"t{tubelet}_thr{threshold:g}"
            out[f"mask_{name}"] = mask.numpy()
            out[f"scores_{name}"] = scores.astype(np.float32)
    return out


def tokenizer(threshold: float):
    from src.models.tokenizer import Tokenizer

    return Tokenizer(
        drop_policy="rlt",
        drop_param=threshold,
        num_frames=FRAMES,
        tubelet_size=2,
        patch_size=(PATCH, PATCH),
        frame_size=(SIZE, SIZE),
        embed_dims=WIDTH,
        transform=None,  # the clips are already normalised
    )


def collate_level(clips: np.ndarray) -> dict[str, np.ndarray]:
    """Kept counts and gathered position rows of the whole batch, in ``collate_tokens``' order."""
    out = tokenizer(0.1)(torch.from_numpy(clips), torch.zeros(len(clips)))
    return {
        "collate_counts": out["num_tokens"].numpy().astype(np.int32),
        "collate_pos": out["pos_embeds"].numpy(),
        "collate_mask": out["token_mask"].numpy(),
    }


def randomise(module: torch.nn.Module, seed: int) -> dict[str, np.ndarray]:
    """Every parameter drawn anew (LayerNorm scales near 1), returned as float32 numpy."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm_scale = name.endswith("weight") and "norm" in name
            param.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.2 * noise)
            state[name] = param.numpy().copy()
    return state


def block_level(seed: int) -> dict[str, np.ndarray]:
    from src.models.vit_helpers import Block

    block = Block(WIDTH, HEADS, qkv_bias=True, init_values=0.0, use_flash_attn=False).eval()
    weights = randomise(block, seed)
    rng = np.random.default_rng(seed)
    n = (FRAMES // 2) * (SIZE // PATCH) ** 2
    x = rng.normal(size=(2, n, WIDTH)).astype(np.float32)
    masks = rng.random((2, n)) < np.array([[0.6], [0.3]])
    masks[:, : (SIZE // PATCH) ** 2] = True  # the first tubelet, as RLT always keeps it
    outputs = []
    with torch.no_grad():
        for clip, mask in zip(x, masks, strict=True):
            outputs.append(block(torch.from_numpy(clip[mask])[None])[0].numpy())
    return {
        "x": x,
        "mask": masks,
        "kept_out": np.concatenate(outputs),
        **{f"w/{k}": v for k, v in weights.items()},
    }


def model_level(clips: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    from src.models.vit_helpers import VisionTransformer

    model = VisionTransformer(
        img_size=SIZE,
        patch_size=PATCH,
        num_classes=CLASSES,
        embed_dims=WIDTH,
        depth=DEPTH,
        num_heads=HEADS,
        drop_path_rate=0.0,
        num_frames=FRAMES,
        tubelet_size=2,
        use_flash_attn=False,
        use_mean_pooling=True,
    ).eval()
    weights = randomise(model, seed)
    logits, counts = [], []
    with torch.no_grad():
        for clip in clips:
            out = tokenizer(0.1)(torch.from_numpy(clip[None]), torch.zeros(1))
            y = model(out["split_crops"], out["num_tokens"], out["pos_embeds"], 1)
            logits.append(y.reshape(-1).numpy())
            counts.append(int(out["num_tokens"].sum()))
    return {
        "clips": clips,
        "logits": np.stack(logits),
        "counts": np.array(counts, np.int32),
        **{f"w/{k}": v for k, v in weights.items()},
    }


def provenance(**seeds: int) -> dict[str, np.ndarray]:
    return {
        "repository": np.array(REPOSITORY),
        "commit": np.array(COMMIT),
        "inputs": np.array(
            f"frames={FRAMES} size={SIZE} patch={PATCH} width={WIDTH} heads={HEADS} "
            f"depth={DEPTH} classes={CLASSES} " + " ".join(f"{k}={v}" for k, v in seeds.items())
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="the authors' repository at COMMIT")
    default_out = Path(__file__).resolve().parents[2] / "tests" / "methods" / "fixtures"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    install_stubs()
    sys.path.insert(0, str(args.checkout.resolve()))
    torch.manual_seed(0)
    clips = synthetic_clips(CLIP_SEED)
    keep = {"clips": clips, **keep_level(args.checkout, clips), **collate_level(clips)}
    files = {
        "rlt_keep.npz": {**keep, **provenance(clip_seed=CLIP_SEED)},
        "rlt_block.npz": {**block_level(BLOCK_SEED), **provenance(block_seed=BLOCK_SEED)},
        "rlt_model.npz": {
            **model_level(clips, MODEL_SEED),
            **provenance(clip_seed=CLIP_SEED, model_seed=MODEL_SEED),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, arrays in files.items():
        np.savez_compressed(args.out / name, **arrays)
        print(f"{name}: {(args.out / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
