r"""VideoMAE-B (16x224x224, tubelet 2x16x16) on Kinetics-400, with the paper's r=150 merging.

No class token; the paper runs VideoMAE without proportional attention.

  vtm-jax bench --config=configs/videomae_b_k400.py
  vtm-jax bench --config=configs/videomae_b_k400.py --config.token_merging.size_weighted_pool=True
"""

import ml_collections

from vtm_jax.config import bench_config, token_merging_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment_name = "videomae_b_k400_tome"
    config.model_name = "videomae"

    config.model = ml_collections.ConfigDict()
    config.model.hidden_size = 768
    config.model.num_heads = 12
    config.model.mlp_dim = 3072
    config.model.num_layers = 12
    config.model.patch_size = (2, 16, 16)  # (t, h, w)
    config.model.layer_norm_eps = 1e-6
    config.model.fc_norm_eps = 1e-6

    config.dataset_configs = ml_collections.ConfigDict()
    config.dataset_configs.num_classes = 400
    config.dataset_configs.num_frames = 16
    config.dataset_configs.stride = 1
    config.dataset_configs.min_resize = 256
    config.dataset_configs.crop_size = 224
    config.dataset_configs.mean = (0.485, 0.456, 0.406)
    config.dataset_configs.std = (0.229, 0.224, 0.225)

    config.token_merging = token_merging_config(
        mode="merge", r=150, prop_attn=False
    )  # the paper runs VideoMAE without prop. attention
    config.bench = bench_config()
    return config
