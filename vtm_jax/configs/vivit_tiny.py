r"""A tiny ViViT (2 layers, 64 wide, 8 frames of 32x32) for quick checks and tests.

Scenic's schema (``model.*``, ``dataset_configs.*``) plus a ``token_merging`` block.

  vtm-jax bench --config=configs/vivit_tiny.py --config.token_merging.r=4
"""

import ml_collections
from ml_collections import config_dict

from vtm_jax.config.blocks import bench_config, token_merging_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment_name = "vivit_tiny"
    config.model_name = "vivit_classification"

    config.model = ml_collections.ConfigDict()
    config.model.attention_config = ml_collections.ConfigDict({"type": "spacetime"})
    config.model.hidden_size = 64
    config.model.num_heads = 4
    config.model.mlp_dim = 128
    config.model.num_layers = 2
    config.model.patches = ml_collections.ConfigDict({"size": (8, 8, 2)})  # (h, w, t)
    config.model.classifier = "token"
    config.model.representation_size = config_dict.placeholder(int)
    config.model.temporal_encoding_config = ml_collections.ConfigDict({"method": "3d_conv"})

    config.dataset_configs = ml_collections.ConfigDict()
    config.dataset_configs.num_classes = 10
    config.dataset_configs.num_frames = 8
    config.dataset_configs.stride = 2
    config.dataset_configs.min_resize = 36
    config.dataset_configs.crop_size = 32
    config.dataset_configs.zero_centering = True

    config.token_merging = token_merging_config(mode="merge", r=8)
    config.bench = bench_config(iterations=5)
    return config
