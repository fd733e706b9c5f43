"""Reference outputs of vid-TLDR (Choi et al., CVPR 2024) from its authors' own code, for tests/methods.

Runs ``multi_modality/utils/vid_TLDR.py`` (``get_objective_score``, ``merging``, ``merge_wavg``)
and the UMT encoder of ``multi_modality/models/backbones/vit/vit.py`` (``Block``,
``PretrainVisionTransformerEncoder``) of mlvlab/vid-TLDR at commit
a25051d4a4808ce2b480bd1a80a96f68c21aa5cb, loaded by file path from a checkout outside this
repository, and writes small float32 arrays:

* ``tests/methods/fixtures/vid_tldr_functions.npz``: two merging steps in a row on random
  inputs (torch seed 0; B 2, 3 heads, 15 then 10 tokens, width 16, r 5 then 3). Step ``s``
  has the attention probabilities ``attn{s}`` (softmax of random logits ``logits{s}``), the
  hidden states ``x{s}`` and sizes (``size1``: none, ones), the saliency ``score{s}`` of
  ``get_objective_score``, the indices ``unm{s}``, ``src{s}``, ``dst{s}`` read from the closure
  ``merging`` returns, and ``merge_wavg``'s outputs ``x{s+1}``, ``size{s+1}``.
* ``tests/methods/fixtures/vid_tldr_block.npz``: one authors' ``Block`` (width 32, 4 heads,
  MLP 64, q/v biases, LayerNorm eps 1e-6, exact GELU; random weights, torch seed 1) on a
  random input of 20 tokens (torch seed 2), r 6, without sizes (``none_*``) and with random
  sizes in [1, 4) (``sized_*``, so proportional attention is on).
* ``tests/methods/fixtures/vid_tldr_model.npz``: the logits of a tiny UMT encoder (4 frames
  of 32x32 pixels, tubelet 2, patch 8, so a (2, 4, 4) grid of 32 tokens; width 32, depth 3,
  4 heads, MLP 64; vid-TLDR r per layer [6, 4, 3]; random weights, torch seed 3) on a random
  video (torch seed 4), with its ``pool_norm`` and a linear head of 5 classes. UMT's encoder
  ends in a LayerNorm (``norm``) before pooling; it is replaced by an identity here, so the
  model is VideoMAE's classifier (mean of the blocks' output, ``fc_norm``, head), the vtm-jax
  backbone the test loads the weights into.

Weights are saved under the authors' parameter names (``w/<name>``), every parameter redrawn
from a seeded generator (the authors' init leaves q/v biases and norms trivial). Run with the
reference environment (torch, timm 0.4.12, einops):

  python scripts/method_fixtures/vid_tldr.py /path/to/vid-TLDR-checkout
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np

REPO = "mlvlab/vid-TLDR"
COMMIT = "a25051d4a4808ce2b480bd1a80a96f68c21aa5cb"
OUT = Path(__file__).resolve().parents[2] / "tests" / "methods" / "fixtures"


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def authors_modules(checkout: Path):
    """The two files by path; ``utils`` is a bare package so its ``__init__`` never runs."""
    root = checkout / "multi_modality"
    sys.modules.setdefault("utils", types.ModuleType("utils"))
    tldr = load("utils.vid_TLDR", root / "utils" / "vid_TLDR.py")
    vit = load("umt_vit", root / "models" / "backbones" / "vit" / "vit.py")
    return tldr, vit


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
            if p.ndim > 1:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def weights(module, prefix=""):
    return {f"w/{prefix}{k}": v.detach().numpy().copy() for k, v in module.state_dict().items()}


def meta(inputs: str):
    return {"repo": np.array(REPO), "commit": np.array(COMMIT), "inputs": np.array(inputs)}


def functions(tldr, torch):
    gen = torch.Generator().manual_seed(0)
    out = {}
    b, h, n, c = 2, 3, 15, 16
    x, size = torch.randn(b, n, c, generator=gen), None
    for step, r in ((1, 5), (2, 3)):
        logits = 2.0 * torch.randn(b, h, n, n, generator=gen)
        attn = logits.softmax(-1)
        score = tldr.get_objective_score(attn)
        merge = tldr.merging(x, r_merge=r, score_obj=score)
        idx = closure(merge)
        new_x, new_size, _ = tldr.merge_wavg(merge, x, size)
        out |= {f"logits{step}": logits, f"attn{step}": attn, f"x{step}": x, f"score{step}": score}
        out |= {f"unm{step}": idx["unm_idx"][..., 0], f"src{step}": idx["src_idx"][..., 0]}
        out |= {f"dst{step}": idx["dst_idx"][..., 0], f"r{step}": torch.tensor(r)}
        out |= {f"x{step + 1}": new_x, f"size{step + 1}": new_size}
        x, size, n = new_x, new_size, n - r
    arrays = {k: v.detach().numpy() for k, v in out.items()}
    inputs = "torch seed 0; B 2, H 3, N 15 then 10, C 16; r 5 then 3; logits 2 * randn"
    return arrays | meta(inputs)


def block(vit, torch):
    norm = partial(torch.nn.LayerNorm, eps=1e-6)
    info = {"use": True, "r": [6], "source_trace": False, "source": None, "size": None}
    blk = vit.Block(
        32, 4, mlp_ratio=2.0, qkv_bias=True, norm_layer=norm, init_values=0.0, i=0, info=info
    )
    randomise(blk, torch, 1)
    blk.eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 20, 32, generator=gen)
    sizes = 1.0 + 3.0 * torch.rand(2, 20, 1, generator=gen)
    out = {"x": x.numpy(), "r": np.array(6)}
    for name, size in (("none", None), ("sized", sizes)):
        info["size"] = size
        with torch.no_grad():
            y = blk(x)
        out[f"{name}_out"] = y.numpy()
        out[f"{name}_size_out"] = info["size"].numpy()
    out["sized_size"] = sizes.numpy()
    inputs = "weights torch seed 1; x torch seed 2 (B 2, N 20, C 32), sizes 1 + 3 rand; r 6"
    return out | weights(blk) | meta(inputs)


def model(vit, torch):
    r = [6, 4, 3]
    norm = partial(torch.nn.LayerNorm, eps=1e-6)
    enc = vit.PretrainVisionTransformerEncoder(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=3,
        num_heads=4,
        mlp_ratio=2.0,
        qkv_bias=True,
        norm_layer=norm,
        init_values=0.0,
        num_frames=4,
        tubelet_size=2,
        vidTLDR_use=True,
        vidTLDR_r=r,
    )
    enc.norm = torch.nn.Identity()  # VideoMAE's classifier pools the blocks' output directly
    pool_norm, head = norm(32), torch.nn.Linear(32, 5)
    parts = torch.nn.ModuleDict({"encoder": enc, "pool_norm": pool_norm, "head": head})
    randomise(parts, torch, 3)
    parts.eval()
    video = torch.randn(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    out = {"video": video.numpy(), "r": np.array(r)}
    with torch.no_grad():
        x, _ = enc(video)
        out["logits"] = head(pool_norm(x.mean(1))).numpy()
    inputs = (
        "weights torch seed 3; video torch seed 4 [B, C, T, H, W] = [1, 3, 4, 32, 32]; "
        "patch 8, tubelet 2, width 32, depth 3, heads 4, MLP 64, 5 classes; r [6, 4, 3]"
    )
    return out | weights(parts) | meta(inputs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help=f"{REPO} at {COMMIT}, outside this repo")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    tldr, vit = authors_modules(args.checkout)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, arrays in (
        ("functions", functions(tldr, torch)),
        ("block", block(vit, torch)),
        ("model", model(vit, torch)),
    ):
        arrays = {
            k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in arrays.items()
        }
        path = args.out / f"vid_tldr_{name}.npz"
        np.savez_compressed(path, **arrays)
        print(f"{path}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
