"""The evaluation and training steps of every backbone lower for GPUs and TPUs over 8 devices.

``jax.export`` lowers the package's own steps (``jobs.evaluation.loop.compiled_step`` and
``jobs.training.steps.compiled_train_step``, each a ``shard_map`` inside a jit; training's
gradients run through merging and proportional attention) for ``cuda`` and ``tpu``, with the
attention backend each platform takes (``models.attention.AUTO_BACKENDS``: XLA's on GPUs, the
Pallas kernel on TPUs), over the single device path's mesh (``runtime.mesh``: one ``batch``
axis, here of 8 devices, as 2 hosts x 4 chips would give; parameters and optimiser state whole
on each device, the batch split). The same interpreter runs one training step on the 8 devices
and on one, which must agree.

8 CPU devices need ``XLA_FLAGS`` before JAX starts, so one fresh interpreter does it all
(:func:`export_all`, :func:`train_step_on_devices`) and prints what each lowered program says
of itself. The models are tiny, but their attentions are long enough (128 to 289 tokens) for
the Pallas kernel, which leaves sequences under 128 tokens to plain attention. Exported
parameters and batches are abstract shapes: nothing is allocated or run, and XLA's compilation
on the device is not covered.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
FRAMES, SIZE, CLASSES, VIEWS = 4, 96, 5, 2  # (2, 8, 8) tubelets: 2 x 144 patches
_SMALL = dict(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2)
MODELS = {
    "vivit": dict(_SMALL, patch_size=[2, 8, 8]),
    "vivit_factorised_encoder": dict(
        hidden_size=32,
        spatial_num_layers=2,
        spatial_num_heads=2,
        spatial_mlp_dim=64,
        temporal_num_layers=1,
        temporal_num_heads=2,
        temporal_mlp_dim=64,
        patch_size=[2, 8, 8],
    ),
    "vivit_factorised_self_attention": dict(_SMALL, patch_size=[2, 8, 8]),
    "vivit_factorised_dot_product": dict(_SMALL, patch_size=[2, 8, 8]),
    "videomae": dict(_SMALL, patch_size=[2, 8, 8]),
    "timesformer": dict(_SMALL, patch_size=[8, 8]),
    "motionformer": dict(_SMALL, patch_size=[2, 8, 8], representation_size=None),
}
# (platform, backend, steps): the backend each platform takes (``auto``) for both steps; cuDNN's
# (by name only) is lowered with its gradient in tests/test_attention_fold.py
CASES = (("cuda", "auto", ("eval", "train")), ("tpu", "auto", ("eval", "train")))
# a string each kernel leaves in the lowered program (None: XLA's own attention)
KERNEL_CALLS = {"jax_nn": None, "pallas_tpu": "tpu_custom_call"}


def _attention(platform: str, backend: str):
    from vtm_jax.models.attention import BACKENDS

    name = _backend_name(platform, backend)
    fn = BACKENDS[name]
    if name == "pallas_tpu":  # trace the Mosaic kernel here, for a TPU
        fn = functools.partial(fn, require_tpu=False)
    return name, fn


def _model(architecture: str, attention_fn, size: int = SIZE, r: int = 16, **changes):
    from vtm_jax.checkpoints.record import ModelRecord
    from vtm_jax.merging import MergingSettings
    from vtm_jax.models.registry import build_model

    record = ModelRecord.from_json(
        {
            "architecture": architecture,
            "model": {**MODELS[architecture], "num_classes": CLASSES, **changes},
            "input": {"num_frames": FRAMES, "image_size": size},
        }
    )
    merging = MergingSettings(mode="merge", r=r, prop_attn=True)  # every layer merges
    return build_model(record, merging, attention_fn)


def _eval_export(model, mesh, platform: str):
    import jax
    import jax.numpy as jnp
    from jax import export

    from vtm_jax.jobs.evaluation.loop import compiled_step
    from vtm_jax.runtime import mesh as device_mesh

    clip = jax.ShapeDtypeStruct((1, FRAMES, SIZE, SIZE, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), clip)["params"]
    whole, split = device_mesh.replicated(mesh), device_mesh.batch_sharding(mesh)
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=whole), params)
    n = mesh.size  # one video of VIEWS clips per device
    batch = {
        "inputs": ((n, VIEWS, FRAMES, SIZE, SIZE, 3), jnp.float32),
        "labels": ((n, 1), jnp.int32),
        "batch_mask": ((n,), jnp.int32),
        "example_index": ((n,), jnp.int32),
    }
    batch = {k: jax.ShapeDtypeStruct(*v, sharding=split) for k, v in batch.items()}
    step = compiled_step(model, [(None, 0, CLASSES)], mesh)
    return export.export(step, platforms=[platform])(params, batch)


def _train_export(model, mesh, platform: str):
    import jax
    import jax.numpy as jnp
    import ml_collections
    from jax import export

    from vtm_jax.jobs.training.optim import make_optimizer
    from vtm_jax.jobs.training.steps import compiled_train_step, init_state
    from vtm_jax.runtime import mesh as device_mesh

    config = ml_collections.ConfigDict({"optimizer": "momentum", "max_grad_norm": 1.0})
    optimizer = make_optimizer(config, total_steps=10)
    clip_shape = (FRAMES, SIZE, SIZE, 3)
    state = jax.eval_shape(functools.partial(init_state, model, optimizer, 0, clip_shape))
    whole, split = device_mesh.replicated(mesh), device_mesh.batch_sharding(mesh)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole), state)
    n = mesh.size
    batch = {
        "inputs": jax.ShapeDtypeStruct((n, *clip_shape), jnp.float32, sharding=split),
        "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=split),
    }
    step = compiled_train_step(model, optimizer, mesh, smoothing=0.1, merge_seed=0)
    return export.export(step, platforms=[platform])(state, batch)


def _described(exported, model, kernel_call: str | None) -> dict:
    """What a lowered step says of itself: platform, devices, shardings, kernel, merging."""
    module = exported.mlir_module()
    main = module[module.index("func.func public @main") :]
    main = main[: main.index(") -> (")]
    args = re.findall(r"sdy\.sharding<@mesh, \[(.*?)\]>\} loc\(\"([^\"]*)\"\)", main)
    # the tokens that leave the last merging layer, [clips, tokens (+ CLS), width], as a shape
    merged = model.token_plan(FRAMES, SIZE)[-1].tokens_out
    width = MODELS[_architecture(model)]["hidden_size"]
    return {
        "platforms": list(exported.platforms),
        "devices": exported.nr_devices,
        "mesh": 'sdy.mesh @mesh = <["batch"=8]>' in module,
        "args": len(exported.in_avals),
        "split": sorted(name for dims, name in args if dims.startswith('{"batch"}')),
        "replicated": sum(1 for dims, name in args if "batch" not in dims),
        "in_shapes": [list(a.shape) for a in exported.in_avals],
        "out_shapes": [list(a.shape) for a in exported.out_avals],
        "kernel": kernel_call is None or kernel_call in module,
        "cudnn": "__cudnn" in module,
        "merged_tokens": any(
            re.search(rf"[<x]{n}x{width}xf32>", module) for n in (merged, merged + 1)
        ),
    }


def _architecture(model) -> str:
    from vtm_jax.models.registry import ARCHITECTURES

    return next(name for name, cls in ARCHITECTURES.items() if cls is type(model))


def export_all() -> dict:
    """Every (backbone, platform, backend, step) exported; what each program says of itself."""
    from vtm_jax.models.registry import ARCHITECTURES
    from vtm_jax.runtime import mesh as device_mesh

    mesh = device_mesh.local_mesh()
    cases, started = [], time.perf_counter()
    for architecture in ARCHITECTURES:
        if architecture not in MODELS:
            continue  # the parent names it
        for platform, backend, steps in CASES:
            name, attention_fn = _attention(platform, backend)
            model = _model(architecture, attention_fn)
            for step in steps:
                export_step = _eval_export if step == "eval" else _train_export
                exported = export_step(model, mesh, platform)
                case = {"architecture": architecture, "platform": platform, "backend": name}
                case["step"] = step
                cases.append({**case, **_described(exported, model, KERNEL_CALLS[name])})
    seconds = round(time.perf_counter() - started, 1)
    return {"registry": list(ARCHITECTURES), "cases": cases, "seconds": seconds}


def train_step_on_devices() -> dict:
    """One training step of a tiny ViViT (merging, proportional attention) on the 8 devices'
    step (:func:`compiled_train_step`) and as one device's plain jit: how far apart they end."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from vtm_jax.jobs.training.optim import make_optimizer
    from vtm_jax.jobs.training.steps import compiled_train_step, init_state, train_step
    from vtm_jax.models.attention import xla_attention
    from vtm_jax.runtime import mesh as device_mesh

    size = 32  # 2 x 16 patches, one layer: this one is compiled, twice, and run
    model = _model("vivit", xla_attention, size=size, r=4, num_layers=1)
    config = ml_collections.ConfigDict({"optimizer": "momentum", "max_grad_norm": 1.0})
    config.lr_configs = {"base_learning_rate": 0.5}
    optimizer = make_optimizer(config, total_steps=2)
    state = jax.jit(functools.partial(init_state, model, optimizer, 0, (FRAMES, size, size, 3)))()
    state["step"] = jnp.int32(1)  # past warm-up's zero learning rate
    rng = np.random.default_rng(0)
    batch = {
        "inputs": rng.normal(size=(DEVICES, FRAMES, size, size, 3)).astype(np.float32),
        "label": rng.integers(0, CLASSES, DEVICES).astype(np.int32),
    }
    options = dict(model=model, optimizer=optimizer, smoothing=0.1, merge_seed=0)
    one, one_metrics = jax.jit(functools.partial(train_step, **options))(state, batch)
    mesh = device_mesh.local_mesh()
    step = compiled_train_step(model, optimizer, mesh, smoothing=0.1, merge_seed=0)
    split = device_mesh.put_batch(batch, mesh)
    eight, eight_metrics = step(device_mesh.replicate(state, mesh), split)
    moved = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), one["params"], state["params"]
    )
    apart = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), one["params"], eight["params"]
    )
    return {
        "devices": len(eight["params"]["cls"].sharding.device_set),
        "moved": max(jax.tree.leaves(moved)),
        "apart": max(jax.tree.leaves(apart)),
        "loss": [float(one_metrics["loss"]), float(eight_metrics["loss"])],
    }


def test_steps_export_for_gpus_and_tpus():
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
    }
    code = (
        "import json, tests.test_export_steps as t\n"
        "print(json.dumps({**t.export_all(), 'trained': t.train_step_on_devices()}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(results["registry"]) == sorted(MODELS), "a backbone without a tiny model here"
    expected = {
        (architecture, platform, _backend_name(platform, backend), step)
        for architecture in MODELS
        for platform, backend, steps in CASES
        for step in steps
    }
    cases = results["cases"]
    assert {(c["architecture"], c["platform"], c["backend"], c["step"]) for c in cases} == expected
    assert len(cases) == len(expected)
    for case in cases:
        what = f"{case['architecture']} {case['step']} for {case['platform']} ({case['backend']})"
        assert case["platforms"] == [case["platform"]] and case["devices"] == DEVICES, what
        assert case["mesh"], what  # the device path's one axis, batch, over 8 devices
        # the batch split over the devices; parameters (and optimiser state) whole on each
        batch = ["inputs", "labels", "batch_mask", "example_index"]
        if case["step"] == "train":
            batch = ["inputs", "label"]
        names = {f"batch['{k}']" for k in batch}  # (jit drops an unused example_index)
        assert names - {"batch['example_index']"} <= set(case["split"]) <= names, what
        assert case["replicated"] == case["args"] - len(batch), what
        assert case["kernel"], f"{what}: the backend's kernel is not in the program"
        assert not case["cudnn"], what  # XLA's attention on GPUs, not cuDNN's
        assert case["merged_tokens"], f"{what}: no merged token count in the program"
        if case["step"] == "eval":  # sums, each head's top-k, scores [videos, classes], finite
            assert [DEVICES, CLASSES] in case["out_shapes"], what
            assert case["out_shapes"][-1] == [DEVICES], what
        else:  # the new state has the state's shapes; then accuracy and loss
            state = case["in_shapes"][: -len(batch)]
            assert case["out_shapes"] == [*state, [], []], what
    print(f"{len(cases)} steps exported in {results['seconds']} s")
    # the 8 devices' training step is the one device's: gradients averaged over equal shares
    trained = results["trained"]
    assert trained["devices"] == DEVICES
    assert trained["moved"] > 1e-3  # the step changed the parameters
    assert trained["apart"] < 1e-5 * max(1.0, trained["moved"]), trained
    assert abs(trained["loss"][0] - trained["loss"][1]) < 1e-5, trained


def _backend_name(platform: str, backend: str) -> str:
    from vtm_jax.models.attention import AUTO_BACKENDS

    return (
        AUTO_BACKENDS["gpu" if platform == "cuda" else platform] if backend == "auto" else backend
    )
