"""The paper's experimental protocol, as configs: one (model, dataset) pair per config file.

Values from docs/method.md: the paper's r per model (§3.5), the hybrid thresholds (§1.5), and the
test data settings of §3.8 (frames, sampling stride per dataset, normalisation), evaluated
single-view (1 clip x 1 centre crop) at 224 px. Each family of experiments in docs/method.md §6 is
an override of these configs, e.g. ``--config.token_merging.mode=random_drop``,
``--config.token_merging.schedule=-1``, ``--config.token_merging.duplicate="(11, 12)"``;
``vtm-jax sweep`` (:mod:`vtm_jax.jobs.sweep`) runs them by name and writes their tables.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from vtm_jax.config.blocks import bench_config, evaluation_config, token_merging_config
from vtm_jax.data.protocols import PAPER_MODEL_INPUTS
from vtm_jax.errors import UserError

MODELS = ("vivit", "videomae", "timesformer", "motionformer")
# The layouts the paper's loaders read: Kinetics as video files, SSv2 and EPIC-KITCHENS as
# frame folders (`ssv2` / `epic_kitchens` read video files instead).
DATASETS = {"k400": "kinetics400", "ssv2": "ssv2_frames", "ek100": "epic_kitchens_frames"}
NUM_CLASSES = {"k400": 400, "ssv2": 174, "ek100": 97 + 300}
CLASS_SPLITS = {"ek100": (97, 300)}  # verb, noun

PAPER_R = {"vivit": 300, "videomae": 150, "timesformer": 18, "motionformer": 18}
MAX_R = {"vivit": 1568, "videomae": 784, "timesformer": 98, "motionformer": 98}
HYBRID_THRESHOLD = {"vivit": 0.4, "videomae": 0.8}


def _model(name: str) -> tuple[str, ml_collections.ConfigDict]:
    """``model_name`` and ``model`` block: Scenic's schema for ViViT, constructor fields else."""
    base = {"hidden_size": 768, "num_heads": 12, "mlp_dim": 3072, "num_layers": 12}
    if name == "vivit":
        model = ml_collections.ConfigDict(base)
        model.attention_config = ml_collections.ConfigDict({"type": "spacetime"})
        model.patches = ml_collections.ConfigDict({"size": (16, 16, 2)})  # (h, w, t)
        model.classifier = "token"
        model.representation_size = config_dict.placeholder(int)
        model.temporal_encoding_config = ml_collections.ConfigDict({"method": "3d_conv"})
        return "vivit_classification", model
    extra = {
        "videomae": {"patch_size": (2, 16, 16), "layer_norm_eps": 1e-6, "fc_norm_eps": 1e-6},
        "timesformer": {"patch_size": (16, 16), "layer_norm_eps": 1e-6, "gelu_approximate": False},
        "motionformer": {"patch_size": (2, 16, 16), "representation_size": 768},
    }[name]
    return name, ml_collections.ConfigDict({**base, **extra})


def get_paper_config(model: str, dataset: str) -> ml_collections.ConfigDict:
    """The config of one (model, dataset) pair of the paper, at its r with mode ``merge``."""
    if model not in MODELS or dataset not in DATASETS:
        raise UserError(
            f"no paper config for ({model!r}, {dataset!r}); models: {', '.join(MODELS)}; "
            f"datasets: {', '.join(DATASETS)}"
        )
    frames, strides, mean, std = PAPER_MODEL_INPUTS[model]
    config = ml_collections.ConfigDict()
    config.experiment_name = f"{model}_b_{dataset}_tome"
    config.model_name, config.model = _model(model)
    config.checkpoint = config_dict.placeholder(str)  # a `vtm-jax convert` output directory
    config.results_path = config_dict.placeholder(str)
    config.multicrop_softmax_logits = False

    config.dataset_name = DATASETS[dataset]
    config.dataset_configs = ml_collections.ConfigDict()
    data = config.dataset_configs
    data.data_dir = config_dict.placeholder(str)  # where the TFDS dataset is built
    data.manual_dir = config_dict.placeholder(str)  # the dataset's own files
    data.split = "validation"
    data.builder_options = config_dict.placeholder(dict)
    data.num_classes = NUM_CLASSES[dataset]
    data.class_splits = CLASS_SPLITS.get(dataset, config_dict.placeholder(tuple))
    data.num_frames = frames
    data.stride = strides[dataset]
    # The paper's SlowFast test loaders (vtm_jax/data/protocols.py), chosen by dataset_name:
    # frames, short side and crops as theirs. min_resize is their TRAIN_JITTER_SCALES[0],
    # the short side of Kinetics' single view; three crops and SSv2 / EPIC-KITCHENS use 224.
    data.protocol = "paper"
    data.paper_loader = config_dict.placeholder(str)  # default: from dataset_name
    data.sampling = "segments" if dataset == "ssv2" else "stride"  # the `centred` protocol's
    data.min_resize = 256
    data.crop_size = 224
    data.mean = mean
    data.std = std
    data.num_test_clips = 1
    data.do_three_spatial_crops = False
    data.test_batch_size = config_dict.placeholder(int)  # global; default one per device

    config.token_merging = token_merging_config(
        mode="merge",
        r=PAPER_R[model],
        # The paper runs VideoMAE without proportional attention (its every VideoMAE line).
        prop_attn=model != "videomae",
        threshold=HYBRID_THRESHOLD.get(model),
    )
    config.eval = evaluation_config()
    config.bench = bench_config()
    return config
