r"""Motionformer-B (trajectory attention, 16x224x224, tubelet 2) on Kinetics-400, r=18 per group.

Merges within the paper's (s f) groups of 196 tokens; motionformer_groups="per_frame" gives the
corrected per-frame groups.

  vtm-jax bench --config=configs/motionformer_b_k400.py
  vtm-jax bench --config=configs/motionformer_b_k400.py --config.token_merging.motionformer_groups=per_frame
"""

import ml_collections

from vtm_jax.config import bench_config, token_merging_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment_name = "motionformer_b_k400_tome"
    config.model_name = "motionformer"

    config.model = ml_collections.ConfigDict()
    config.model.hidden_size = 768
    config.model.num_heads = 12
    config.model.mlp_dim = 3072
    config.model.num_layers = 12
    config.model.patch_size = (2, 16, 16)  # (t, h, w)
    config.model.representation_size = 768  # pre-logits Linear + tanh
    config.model.layer_norm_eps = 1e-6
    config.model.original_temporal_values = True  # the original trajectory-attention code

    config.dataset_configs = ml_collections.ConfigDict()
    config.dataset_configs.num_classes = 400
    config.dataset_configs.num_frames = 16
    config.dataset_configs.stride = 4
    config.dataset_configs.min_resize = 256
    config.dataset_configs.crop_size = 224
    config.dataset_configs.mean = (0.5, 0.5, 0.5)
    config.dataset_configs.std = (0.5, 0.5, 0.5)

    config.token_merging = token_merging_config(
        mode="merge", r=18
    )  # r per merge group of 196 tokens
    config.bench = bench_config()
    return config
