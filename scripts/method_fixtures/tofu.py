"""Reference outputs of ToFu (Kim et al., WACV 2024) from the reimplementation in hchautran/PiToMe.

ToFu has no official code; the reference is ``algo/tofu/merge.py`` (``bipartite_soft_matching``
with its ``prune``, ``mean`` and ``tofu`` merges, ``merge_source``) and
``algo/tofu/patch/{timm,deit,mae}.py`` (``ToFuBlock``, ``ToFuAttention``, both ``apply_patch``)
of hchautran/PiToMe at commit 550b5deed94aadfeac28bfbe381d87e672044a40, imported by file path
from a checkout outside this repository, and writes small float32 arrays:

* ``tests/methods/fixtures/tofu_merge.npz``: ``bipartite_soft_matching`` on random keys and
  hidden states (torch seed 0) for each case of ``CASES``: the index tensors of the match (from
  the merge's closure: ``unm_idx``, ``src_idx``, ``dst_idx``), the outputs of ``merge(x, mode)``
  for ``prune``, ``mean`` and ``tofu`` (the port's MLERP), and ``merge_source`` (``amax``) from
  the identity.
* ``tests/methods/fixtures/tofu_block.npz``: single ``ToFuBlock`` runs inside the tiny model of
  ``pitome.py`` (blocks 0 and 3 of 4: prune, then ``tofu`` under the DeiT patch and ``mean``
  under the MAE patch), keep ratio 0.8; input and output recorded by hooks.
* ``tests/methods/fixtures/tofu_model.npz``: the logits of that tiny timm ``VisionTransformer``
  (weights redrawn with torch seed 1, images torch seed 2, as in ``pitome.py``): unpatched,
  DeiT patch and MAE patch (``global_pool`` False, ``return_flop=False``) at keep ratio 0.8,
  and the weights under timm's names (``w/<name>``).

Run with the reference environment (torch, timm 0.4.12):

  python scripts/method_fixtures/tofu.py /path/to/PiToMe-checkout
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path

import numpy as np
from pitome import KEEP_RATIO, MODEL, NUM_CLASSES, closure, save, tiny_model

REPO = "hchautran/PiToMe"
COMMIT = "550b5deed94aadfeac28bfbe381d87e672044a40"
# name: (batch, tokens (class token included), class token, key width, hidden width, keep ratio)
CASES = {
    "a": (2, 25, True, 8, 6, 0.7),
    "b": (2, 24, False, 8, 6, 0.6),
    "c": (2, 25, True, 6, 5, 0.5),
}
BLOCKS = (0, 3)


def load_authors(root: Path):
    """The port's merge and patch modules, loaded as a package without its ``__init__``s."""
    for name, sub in (("tofu_ref", "algo/tofu"), ("tofu_ref.patch", "algo/tofu/patch")):
        package = types.ModuleType(name)
        package.__path__ = [str(root / sub)]
        sys.modules[name] = package
    names = ("merge", "patch.timm", "patch.deit", "patch.mae")
    return [importlib.import_module(f"tofu_ref.{n}") for n in names]


def merge_cases(torch, merge) -> dict:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, (b, n, cls, c_key, c, ratio) in CASES.items():
        metric = torch.randn(b, n, c_key, generator=gen)
        x = torch.randn(b, n, c, generator=gen)
        fn = merge.bipartite_soft_matching(metric, ratio=ratio, class_token=cls)
        inner = closure(fn)
        out.update({f"{name}/metric": metric, f"{name}/x": x})
        for idx in ("unm_idx", "src_idx", "dst_idx"):
            out[f"{name}/{idx}"] = inner[idx].reshape(b, -1)
        for mode in ("prune", "mean", "tofu"):
            out[f"{name}/{mode}"] = fn(x, mode=mode)
        out[f"{name}/source_amax"] = merge.merge_source(fn, x, None)
    return out


def record_blocks(model) -> list:
    """Hooks recording (input x, output x) of each block."""
    runs = [None] * len(model.blocks)

    def hook(i):
        def record(_, args, output):
            runs[i] = (args[0].detach().clone(), output.detach().clone())

        return record

    for i, block in enumerate(model.blocks):
        block.register_forward_hook(hook(i))
    return runs


def model_runs(torch, vision_transformer, deit, mae) -> tuple[dict, dict]:
    size = MODEL["img_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    plain = tiny_model(torch, vision_transformer)
    model_out = {"images": images, "logits/none": plain(images)}
    model_out |= {f"w/{k}": v for k, v in plain.state_dict().items()}
    block_out = {}
    for name, patch in (("deit", deit), ("mae", mae)):
        model = tiny_model(torch, vision_transformer, patch)
        if name == "mae":
            model.global_pool = False  # timm's ViT has none; MAE's class-token path
        runs = record_blocks(model)
        model_out[f"logits/{name}"] = model(images, return_flop=False)
        if model._info["size"] is not None:
            raise SystemExit("the port tracked sizes; the JAX rule assumes it never does")
        for i in BLOCKS:
            block_out[f"{name}/{i}/x_in"], block_out[f"{name}/{i}/x_out"] = runs[i]
    return model_out, block_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a checkout of hchautran/PiToMe at COMMIT")
    root = parser.parse_args().checkout
    import torch
    from timm.models import vision_transformer

    torch.set_grad_enabled(False)
    merge, _, deit, mae = load_authors(root)
    meta = {"repository": REPO, "commit": COMMIT}
    cases = {f"case/{k}": np.asarray(v, np.float64) for k, v in CASES.items()}
    save("merge", merge_cases(torch, merge), {**meta, **cases, "seed": 0}, mode="tofu")
    model, blocks = model_runs(torch, vision_transformer, deit, mae)
    shape = {**meta, "keep_ratio": KEEP_RATIO, "num_classes": NUM_CLASSES, "seeds": [1, 2]}
    shape |= {f"model/{k}": v for k, v in MODEL.items()}
    save("block", blocks, {**shape, "blocks": list(BLOCKS)}, mode="tofu")
    save("model", model, shape, mode="tofu")


if __name__ == "__main__":
    main()
