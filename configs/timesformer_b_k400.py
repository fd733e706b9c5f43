r"""TimeSformer-B (divided space-time, 8x224x224) on Kinetics-400, the paper's r=18 per frame.

Each frame is merged independently (196 patches per frame).

  vtm-jax bench --config=configs/timesformer_b_k400.py
"""

import ml_collections

from vtm_jax.config import bench_config, token_merging_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment_name = "timesformer_b_k400_tome"
    config.model_name = "timesformer"

    config.model = ml_collections.ConfigDict()
    config.model.hidden_size = 768
    config.model.num_heads = 12
    config.model.mlp_dim = 3072
    config.model.num_layers = 12
    config.model.patch_size = (16, 16)  # (h, w), per frame
    config.model.layer_norm_eps = 1e-6
    config.model.gelu_approximate = False

    config.dataset_configs = ml_collections.ConfigDict()
    config.dataset_configs.num_classes = 400
    config.dataset_configs.num_frames = 8
    config.dataset_configs.stride = 32
    config.dataset_configs.min_resize = 256
    config.dataset_configs.crop_size = 224
    config.dataset_configs.mean = (0.45, 0.45, 0.45)
    config.dataset_configs.std = (0.225, 0.225, 0.225)

    config.token_merging = token_merging_config(mode="merge", r=18)  # r per frame (196 patches)
    config.bench = bench_config()
    return config
