r"""ViViT-B/16x2 factorised encoder (Scenic's model 2) on Kinetics-400, merging per frame.

Scenic's schema (``model.*``, ``dataset_configs.*``) plus a ``token_merging`` block.

  vtm-jax bench --config=configs/vivit_b_fe_k400.py
  vtm-jax bench --config=configs/vivit_b_fe_k400.py --config.token_merging.temporal_r=2
"""

import ml_collections
from ml_collections import config_dict

from vtm_jax.config.blocks import bench_config, token_merging_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment_name = "vivit_b_fe_k400_tome"
    config.model_name = "vivit_classification"

    config.model = ml_collections.ConfigDict()
    config.model.attention_config = ml_collections.ConfigDict({"type": "factorized_encoder"})
    config.model.hidden_size = 768
    config.model.spatial_transformer = ml_collections.ConfigDict(
        {"num_heads": 12, "mlp_dim": 3072, "num_layers": 12}
    )
    config.model.temporal_transformer = ml_collections.ConfigDict(
        {"num_heads": 12, "mlp_dim": 3072, "num_layers": 4}
    )
    config.model.patches = ml_collections.ConfigDict({"size": (16, 16, 2)})  # (h, w, t)
    config.model.classifier = "token"
    config.model.representation_size = config_dict.placeholder(int)
    config.model.temporal_encoding_config = ml_collections.ConfigDict({"method": "3d_conv"})

    config.dataset_configs = ml_collections.ConfigDict()
    config.dataset_configs.num_classes = 400
    config.dataset_configs.num_frames = 32
    config.dataset_configs.stride = 2
    config.dataset_configs.min_resize = 256
    config.dataset_configs.crop_size = 224
    config.dataset_configs.zero_centering = True

    config.token_merging = token_merging_config(
        mode="merge", r=18
    )  # r per frame (196 patches); temporal_r for the temporal encoder
    config.bench = bench_config()
    return config
