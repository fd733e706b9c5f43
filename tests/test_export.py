"""Every backbone, with each accelerator attention backend, lowers for its accelerator.

``jax.export`` lowers a program for a platform other than the one it runs on, so a CPU-only
machine proves that the GPU and TPU paths compile to StableHLO (XLA's compilation of that
StableHLO happens on the device and is not covered). The models are the paper's own configs
(``configs/<backbone>_k400.py``: full width, depth and input, the paper's r): parameters and
the clip are abstract shapes, so nothing is allocated and a lowering takes seconds whatever
the model's size, while token counts, merge schedules and attention shapes are the real ones.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
from jax._src.lib import cuda_versions

from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.config.loading import load_config, record_from_config
from vtm_jax.merging import MergingSettings
from vtm_jax.models.attention import cudnn_attention, jax_nn_attention, pallas_tpu_attention
from vtm_jax.models.registry import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONES = ("vivit_b", "vivit_b_fe", "videomae_b", "timesformer_b", "motionformer_b")

# backend name -> (attention function, export platform, a string its kernel leaves in the
# lowered module, or None where the backend is XLA's own attention)
BACKENDS = {
    "jax_nn": (jax_nn_attention, "cuda", None),
    "cudnn": (cudnn_attention, "cuda", "__cudnn$fmha"),
    # require_tpu=False: trace the Mosaic kernel here, for a TPU.
    "pallas_tpu": (
        functools.partial(pallas_tpu_attention, require_tpu=False),
        "tpu",
        "tpu_custom_call",
    ),
}

# A CPU jaxlib has no cuda_versions module, and JAX's cuDNN lowering asks it for the installed
# cuDNN version (check_cudnn_version) before emitting the custom call. That query cannot be
# answered off a GPU machine, so it is pinned to cuDNN 9.10 (91000) here; the version only
# gates features vtm-jax does not use (fp8, MLA, compute capability 10.3), and the call's
# shapes, dtypes, bias layout and head-dim checks all run as they would on a GPU.
PINNED_CUDNN = 91000


@functools.cache
def _record_and_merging(backbone: str) -> tuple[ModelRecord, MergingSettings]:
    config = load_config([f"--config={REPO}/configs/{backbone}_k400.py"])
    return record_from_config(config), MergingSettings.from_dict(config.token_merging)


@pytest.fixture
def pinned_cudnn(monkeypatch):
    if cuda_versions is None:
        monkeypatch.setattr(cudnn_fa, "check_cudnn_version", lambda: PINNED_CUDNN)


def _export(record: ModelRecord, merging: MergingSettings, attention_fn, platform: str):
    model = build_model(record, merging, attention_fn)
    size = record.image_size
    clip = jax.ShapeDtypeStruct((1, record.num_frames, size, size, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), clip)["params"]
    # cuDNN's custom calls have no export compatibility guarantee (JAX refuses to serialise
    # them by default); the check is about keeping an artifact loadable across JAX versions,
    # not about whether it lowers, so it is waived for them.
    waived = [export.DisabledSafetyCheck.custom_call(t) for t in _CUDNN_TARGETS]
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    return export.export(forward, platforms=[platform], disabled_checks=waived)(params, clip)


_CUDNN_TARGETS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaScaleBiasSoftmax")


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("paper_r", [False, True], ids=["r0", "paper_r"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_backbone_exports_for_its_accelerator(backbone, paper_r, backend, pinned_cudnn):
    record, paper = _record_and_merging(backbone)
    merging = paper if paper_r else MergingSettings()
    attention_fn, platform, kernel = BACKENDS[backend]
    exported = _export(record, merging, attention_fn, platform)
    assert exported.platforms == (platform,)
    num_classes = record.num_classes
    assert [a.shape for a in exported.out_avals] == [(1, num_classes)]
    module = exported.mlir_module()
    if kernel is not None:  # the fused kernel itself is in the program, not a fallback
        assert kernel in module, f"{backend} left no {kernel} call in {backbone}"
    assert "__cudnn" not in module or backend == "cudnn"
    # proportional attention's key bias (paper_r) is folded into the keys, so cuDNN's bias
    # variant does not run; TimeSformer's spatial bias spares the CLS query (a bias per query
    # and key, built by the model), which cuDNN still takes whole
    whole_bias = backend == "cudnn" and paper_r and backbone == "timesformer_b"
    assert ("fmhaScaleBias" in module) == whole_bias
