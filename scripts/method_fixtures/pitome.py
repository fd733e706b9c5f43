"""Reference outputs of PiToMe (Tran et al., NeurIPS 2024) from its authors' own code, for tests/methods.

Runs ``algo/pitome/merge.py`` (``pitome_vision``, ``pitome``, ``pitome_bsm``, ``merge_wavg``,
``merge_source``) and ``algo/pitome/patch/{timm,deit,mae}.py`` (``PiToMeBlock``,
``PiToMeAttention``, both ``apply_patch``) of hchautran/PiToMe at commit
550b5deed94aadfeac28bfbe381d87e672044a40, imported by file path from a checkout outside this
repository (``import algo.pitome`` would pull in LAVIS and transformers through ``patch/``),
and writes small float32 arrays:

* ``tests/methods/fixtures/pitome_merge.npz``: ``pitome_vision`` then ``merge_wavg`` and
  ``merge_source`` on random keys, hidden states and sizes (torch seed 0), for each case of
  ``CASES`` and both variants (``use_bsm_pitome`` False and True): the energies (the tensor
  ``pitome_vision`` sorts, recorded as it calls ``torch.argsort``), the sort ``indices``, the
  index tensors of the merge (read from its closure: ``protected_idx``, ``a_idx``, ``b_idx``,
  ``dst_idx``, and for ``pitome_bsm`` also ``unm_idx``, ``src_idx``), the merged ``x`` and
  ``size`` and the dense source (from the identity).
* ``tests/methods/fixtures/pitome_block.npz``: single ``PiToMeBlock`` runs inside the tiny
  model below (blocks 0, 2 and 3, their input and input sizes recorded by hooks), under the
  DeiT patch and the MAE patch, keep ratio 0.8 (the blocks' weights are the model's, in
  ``pitome_model.npz``).
* ``tests/methods/fixtures/pitome_model.npz``: the logits of a tiny timm 0.4.12
  ``VisionTransformer`` (32x32 images, patch 4, so 64 patches and a class token; width 32,
  depth 4, 4 heads, MLP 64, 5 classes; random weights, torch seed 1) on two random images
  (torch seed 2): unpatched, DeiT patch at keep ratio 0.8, MAE patch at keep ratio 0.8 (with
  ``global_pool`` False, i.e. the class token's logits as DeiT's, and ``return_flop=False``,
  since the MAE patch's flop count moves a tensor to CUDA).

Weights are saved under the authors' (timm's) parameter names (``w/<name>``); timm's
initialisation (std 0.02, zero biases) makes keys nearly equal, so every parameter is redrawn
from a seeded generator. Run with the reference environment (torch, timm 0.4.12):

  python scripts/method_fixtures/pitome.py /path/to/PiToMe-checkout
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path

import numpy as np

REPO = "hchautran/PiToMe"
COMMIT = "550b5deed94aadfeac28bfbe381d87e672044a40"
OUT = Path(__file__).resolve().parents[2] / "tests" / "methods" / "fixtures"
# name: (batch, tokens after the class token, class token, key width, hidden width, keep ratio,
#        margin, alpha, sizes given)
CASES = {
    "a": (2, 24, True, 8, 6, 0.75, 0.6, 1.0, True),
    "b": (2, 25, False, 8, 6, 0.6, 0.3, 0.5, False),
    "c": (2, 20, True, 6, 5, 0.5, 0.75, 1.0, True),
}
MODEL = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=4, mlp_ratio=2.0)
NUM_CLASSES, KEEP_RATIO, BLOCKS = 5, 0.8, (0, 2, 3)


def load_authors(root: Path):
    """The authors' merge and patch modules, loaded as a package without its ``__init__``s."""
    for name, sub in (("pitome_ref", "algo/pitome"), ("pitome_ref.patch", "algo/pitome/patch")):
        package = types.ModuleType(name)
        package.__path__ = [str(root / sub)]
        sys.modules[name] = package
    names = ("merge", "patch.timm", "patch.deit", "patch.mae")
    return [importlib.import_module(f"pitome_ref.{n}") for n in names]


class SortRecorder:
    """Stands in for ``torch`` inside merge.py, recording what ``torch.argsort`` sorts."""

    def __init__(self, torch):
        self._torch, self.sorted = torch, []

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def argsort(self, values, *args, **kwargs):
        self.sorted.append(values.detach().clone())
        return self._torch.argsort(values, *args, **kwargs)


def closure(fn) -> dict:
    return dict(
        zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__), strict=True)
    )


def merge_cases(torch, merge) -> dict:
    recorder = SortRecorder(torch)
    merge.torch = recorder
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, (b, t, cls, c_key, c, ratio, margin, alpha, sized) in CASES.items():
        n = t + int(cls)
        metric = torch.randn(b, n, c_key, generator=gen)
        x = torch.randn(b, n, c, generator=gen)
        size = torch.randint(1, 4, (b, n, 1), generator=gen).float() if sized else None
        out.update({f"{name}/metric": metric, f"{name}/x": x})
        if sized:
            out[f"{name}/size"] = size
        for bsm in (False, True):
            key = f"{name}/{'pitome_bsm' if bsm else 'pitome'}"
            recorder.sorted.clear()
            fn = merge.pitome_vision(
                metric,
                ratio=ratio,
                margin=margin,
                class_token=cls,
                alpha=alpha,
                use_bsm_pitome=bsm,
            )
            (energy,) = recorder.sorted
            inner = closure(fn)
            out[f"{key}/energy"] = energy
            out[f"{key}/indices"] = torch.argsort(energy, descending=True)
            for idx in ("protected_idx", "a_idx", "b_idx", "dst_idx", "unm_idx", "src_idx"):
                if idx in inner:
                    out[f"{key}/{idx}"] = inner[idx].reshape(b, -1)
            out[f"{key}/x_out"], out[f"{key}/size_out"] = merge.merge_wavg(fn, x, size)
            out[f"{key}/source_out"] = merge.merge_source(fn, x, None)
    merge.torch = torch
    return out


def randomise(module, torch, seed: int) -> None:
    """Redraw every parameter: weights ~ N(0, 1/fan_in), LayerNorm scales near 1, biases small,
    class token and positions N(0, 0.5^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name in ("cls_token", "pos_embed"):
                p.copy_(0.5 * noise)
            elif p.ndim > 1:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def tiny_model(torch, vision_transformer, patch=None):
    model = vision_transformer.VisionTransformer(num_classes=NUM_CLASSES, qkv_bias=True, **MODEL)
    randomise(model, torch, 1)
    model.eval()
    if patch is not None:
        patch.apply_patch(model)
        model.ratio = KEEP_RATIO
    return model


def record_blocks(model, info) -> list:
    """Hooks recording (input x, input size, output x, output size) of each block."""
    runs = [None] * len(model.blocks)

    def before(i):
        def hook(_, args):
            size = info["size"]
            runs[i] = [args[0].detach().clone(), None if size is None else size.clone()]

        return hook

    def after(i):
        def hook(_, __, output):
            runs[i] += [output.detach().clone(), info["size"].clone()]

        return hook

    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(before(i))
        block.register_forward_hook(after(i))
    return runs


def model_runs(torch, vision_transformer, deit, mae) -> tuple[dict, dict]:
    images = torch.randn(
        2, 3, MODEL["img_size"], MODEL["img_size"], generator=torch.Generator().manual_seed(2)
    )
    plain = tiny_model(torch, vision_transformer)
    weights = {f"w/{k}": v for k, v in plain.state_dict().items()}
    model_out = {"images": images, "logits/none": plain(images)}
    block_out = {}
    for name, patch in (("deit", deit), ("mae", mae)):
        model = tiny_model(torch, vision_transformer, patch)
        if name == "mae":
            model.global_pool = False  # timm's ViT has none; MAE's class-token path
        runs = record_blocks(model, model._info)
        model_out[f"logits/{name}"] = model(images, return_flop=False)
        for i in BLOCKS:
            x_in, size_in, x_out, size_out = runs[i]
            block_out[f"{name}/{i}/x_in"], block_out[f"{name}/{i}/x_out"] = x_in, x_out
            block_out[f"{name}/{i}/size_out"] = size_out
            if size_in is not None:
                block_out[f"{name}/{i}/size_in"] = size_in
    model_out.update(weights)
    return model_out, block_out


def save(name: str, arrays: dict, meta: dict, mode: str = "pitome") -> None:
    data = {
        k: np.asarray(v.detach().numpy() if hasattr(v, "detach") else v) for k, v in arrays.items()
    }
    data = {
        k: v.astype(np.float32) if v.dtype.kind == "f" else v.astype(np.int32)
        for k, v in data.items()
    }
    for k, v in meta.items():
        data[f"meta/{k}"] = np.asarray(v)
    path = OUT / f"{mode}_{name}.npz"
    np.savez_compressed(path, **data)
    print(f"{path}: {path.stat().st_size} bytes, {len(data)} arrays")


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
    save("merge", merge_cases(torch, merge), {**meta, **cases, "seed": 0})
    model, blocks = model_runs(torch, vision_transformer, deit, mae)
    shape = {**meta, "keep_ratio": KEEP_RATIO, "num_classes": NUM_CLASSES, "seeds": [1, 2]}
    shape |= {f"model/{k}": v for k, v in MODEL.items()}
    save("block", blocks, {**shape, "blocks": list(BLOCKS)})
    save("model", model, shape)


if __name__ == "__main__":
    main()
