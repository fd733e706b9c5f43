"""Reference outputs of MCTF (Lee, Choi, Kim, CVPR 2024) from its authors' own code, for tests/methods.

Runs ``utils/mctf.py`` (``bipartite_soft_matching``, ``merge_wavg``, ``mctf``),
``models/modules/blocks.py`` (``Block_DEIT``), ``models/SA/MHSA.py`` and ``models/deit.py``
(``VisionTransformer``) of mlvlab/MCTF at commit 2004da0cad3231fa74cbd60b6042b0bd133aacde,
imported from a checkout outside this repository, and writes small float32 arrays:

* ``tests/methods/fixtures/mctf_functions.npz``: ``bipartite_soft_matching`` on random hidden
  states, attention probabilities (softmax of 2 * randn logits) and sizes (torch seed 0), for
  three cases (B 2, 3 heads, width 16): ``cls`` (17 tokens, one protected, r 6, sizes in
  [1, 4), bidirectional, taus 1/20/40), ``nocls`` (16 tokens, none protected, r 5, no sizes,
  bidirectional, taus 0.5/5/10) and ``uni`` (17 tokens, one protected, r 4, sizes,
  one-directional, taus 1/20/40). For each: the inputs, the indices ``unm``, ``src``, ``dst``
  (and ``unm2``, ``src2``, ``dst2`` when bidirectional) read from the closure the function
  returns, and ``merge_wavg(..., one_step_ahead=1, pooling_type=p)``'s ``x``, ``size`` and
  merged attention for every pooling type ``p`` in 0..3 (``{case}_p{p}_x`` ...).
* ``tests/methods/fixtures/mctf_block.npz``: one ``Block_DEIT`` (width 32, 4 heads, MLP 64,
  qkv bias, LayerNorm eps 1e-6, exact GELU; random weights, torch seed 1) on a random input of
  17 tokens with a class token (torch seed 2), r 6, prop-attn on, taus 1/20/40, bidirectional,
  pooling type 1, for one_step_ahead 1 and 2, without sizes and with sizes in [1, 4).
* ``tests/methods/fixtures/mctf_model.npz``: the logits of a tiny DeiT ``VisionTransformer``
  (48x48 images, patch 8: 36 patches and a class token; width 32, depth 5, 4 heads, MLP 64,
  5 classes; random weights, torch seed 3) on a random image (torch seed 4), with the
  authors' evaluation settings ``mctf_type [8, 0, 0, 1, 1, 1, 20, 40, 1, 1, 0]`` and
  ``activate_layer [1, 2, 3, 4]`` (r_eval 8): 37 -> 37 -> 29 -> 21 -> 13 -> 10 tokens, the
  last layer cut to 3 by the authors' keep-10 rule. Also one_step_ahead 2 (``logits_osa2``).

Weights are saved under the authors' parameter names (``w/<name>``), every parameter redrawn
from a seeded generator (the authors' init zeroes biases and the head). Run with the
reference environment (torch, timm 0.4.12):

  python scripts/method_fixtures/mctf.py /path/to/MCTF-checkout
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import numpy as np

REPO = "mlvlab/MCTF"
COMMIT = "2004da0cad3231fa74cbd60b6042b0bd133aacde"
OUT = Path(__file__).resolve().parents[2] / "tests" / "methods" / "fixtures"
INDICES = ("unm_idx", "src_idx", "dst_idx", "unm_idx2", "src_idx2", "dst_idx2")
# (name, tokens, protected, r, sized, bidirection, (tau_sim, tau_info, tau_size))
CASES = (
    ("cls", 17, 1, 6, True, 1, (1, 20, 40)),
    ("nocls", 16, 0, 5, False, 1, (0.5, 5, 10)),
    ("uni", 17, 1, 4, True, 0, (1, 20, 40)),
)


def closure(fn):
    """The variables a closure captured (the authors' indices live there)."""
    out = {}
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__, strict=True):
        try:
            out[name] = cell.cell_contents
        except ValueError:  # a variable the enclosing function never set
            pass
    return out


def randomise(module, torch, seed):
    """Redraw every parameter: weights ~ N(0, 1/fan_in), LayerNorm scales near 1, biases small."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim > 1 and "token" not in name and "pos_embed" not in name:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim > 1:  # class token, position embeddings
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.1 * noise)


def weights(module, prefix=""):
    return {f"w/{prefix}{k}": v.detach().numpy().copy() for k, v in module.state_dict().items()}


def meta(inputs: str):
    return {"repo": np.array(REPO), "commit": np.array(COMMIT), "inputs": np.array(inputs)}


def functions(mctf, torch):
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, n, protected, r, sized, bidirection, taus in CASES:
        x = torch.randn(2, n, 16, generator=gen)
        attn = (2.0 * torch.randn(2, 3, n, n, generator=gen)).softmax(-1)
        size = 1.0 + 3.0 * torch.rand(2, n, 1, generator=gen) if sized else None
        merge, _ = mctf.bipartite_soft_matching(x, attn, size, r, protected, *taus, bidirection)
        idx = closure(merge)
        out |= {f"{name}_x": x, f"{name}_attn": attn}
        if sized:
            out[f"{name}_size"] = size
        out |= {f"{name}_{k.replace('_idx', '')}": idx[k][..., 0] for k in INDICES if k in idx}
        for p in range(4):
            x_m, size_m, attn_m = mctf.merge_wavg(merge, x, size, attn, 1, p)
            out |= {f"{name}_p{p}_x": x_m, f"{name}_p{p}_size": size_m}
            out[f"{name}_p{p}_attn"] = attn_m
    arrays = {k: v.detach().numpy() for k, v in out.items()}
    inputs = "; ".join(
        f"{c[0]}: N {c[1]}, protected {c[2]}, r {c[3]}, sizes {c[4]}, bidirection {c[5]}, "
        f"taus {c[6]}"
        for c in CASES
    )
    return arrays | meta(f"torch seed 0; B 2, H 3, C 16; {inputs}")


def info_dict(one_step_ahead, r):
    return {
        "use_mctf": True,
        "activate": [0],
        "r_student": r,
        "r_teacher_max": 0,
        "trace_source": 0,
        "prop_attn": 1,
        "one_step_ahead": one_step_ahead,
        "tau_sim": 1,
        "tau_info": 20,
        "tau_size": 40,
        "bidirection": 1,
        "pooling_type": 1,
        "num_protected": 1,
        "r_eval": r,
        "student_size": None,
        "student_source": None,
    }


def block(blocks, torch):
    norm = partial(torch.nn.LayerNorm, eps=1e-6)
    info = info_dict(1, 6)
    blk = blocks.Block_DEIT(
        32, 4, mlp_ratio=2.0, qkv_bias=True, norm_layer=norm, info=info, layer=0
    )
    randomise(blk, torch, 1)
    blk.eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 17, 32, generator=gen)
    sizes = 1.0 + 3.0 * torch.rand(2, 17, 1, generator=gen)
    out = {"x": x.numpy(), "sized_size": sizes.numpy(), "r": np.array(6)}
    for osa in (1, 2):
        for name, size in (("none", None), ("sized", sizes)):
            info.update(info_dict(osa, 6))
            info["student_size"] = size
            with torch.no_grad():
                y = blk(x, prefix="student_")
            out[f"osa{osa}_{name}_out"] = y.numpy()
            out[f"osa{osa}_{name}_size_out"] = info["student_size"].numpy()
    inputs = "weights torch seed 1; x torch seed 2 (B 2, N 17, C 32), sizes 1 + 3 rand; r 6"
    return out | weights(blk) | meta(inputs)


def model(deit, torch):
    def build(one_step_ahead):
        return deit.VisionTransformer(
            input_size=48,
            patch_size=8,
            num_classes=5,
            embed_dim=32,
            depth=5,
            num_heads=4,
            mlp_ratio=2.0,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            task_type=[1, 0, 0, 0],
            use_mctf=True,
            activate_layer=[1, 2, 3, 4],
            mctf_type=[8, 0, 0, 1, one_step_ahead, 1, 20, 40, 1, 1, 0],
        )

    vit = build(1)
    randomise(vit, torch, 3)
    vit.eval()
    image = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    osa2 = build(2)
    osa2.load_state_dict(vit.state_dict())
    osa2.eval()
    with torch.no_grad():
        out = {
            "image": image.numpy(),
            "logits": vit(image, r_eval=8).numpy(),
            "logits_osa2": osa2(image, r_eval=8).numpy(),
            "r": np.array(8),
        }
    inputs = (
        "weights torch seed 3; image torch seed 4 [B, C, H, W] = [1, 3, 48, 48]; patch 8, "
        "width 32, depth 5, heads 4, MLP 64, 5 classes; mctf_type [8,0,0,1,1,1,20,40,1,1,0], "
        "activate_layer [1,2,3,4], r_eval 8"
    )
    return out | weights(vit) | meta(inputs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help=f"{REPO} at {COMMIT}, outside this repo")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(args.checkout))
    from models import deit
    from models.modules import blocks
    from utils import mctf

    args.out.mkdir(parents=True, exist_ok=True)
    for name, arrays in (
        ("functions", functions(mctf, torch)),
        ("block", block(blocks, torch)),
        ("model", model(deit, torch)),
    ):
        arrays = {
            k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in arrays.items()
        }
        path = args.out / f"mctf_{name}.npz"
        np.savez_compressed(path, **arrays)
        print(f"{path}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
