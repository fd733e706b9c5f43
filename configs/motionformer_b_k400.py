r"""Motionformer-B (trajectory attention, 16x224x224, tubelet 2) on Kinetics-400, r=18 per group.

Merges within the paper's (s f) groups of 196 tokens; motionformer_groups="per_frame" gives the
corrected per-frame groups.

  vtm-jax bench --config=configs/motionformer_b_k400.py
  vtm-jax bench --config=configs/motionformer_b_k400.py --config.token_merging.motionformer_groups=per_frame
"""

import ml_collections
from ml_collections import config_dict


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

    config.token_merging = ml_collections.ConfigDict()
    config.token_merging.mode = "merge"
    config.token_merging.r = 18
    config.token_merging.schedule = 0.0
    config.token_merging.prop_attn = True
    config.token_merging.head_aggregation = "mean"
    config.token_merging.threshold = config_dict.placeholder(float)
    config.token_merging.seed = 0
    config.token_merging.trace_source = "none"
    config.token_merging.duplicate = config_dict.placeholder(tuple)  # (layer, quantity)
    config.token_merging.size_weighted_pool = False
    config.token_merging.motionformer_groups = "paper"

    config.bench = ml_collections.ConfigDict()
    config.bench.batch_size = 1
    config.bench.warmup = 1
    config.bench.iterations = 3
    config.bench.attention = "auto"
    # Sweeps (each None: just the token_merging block); the r=0 baseline always runs first.
    config.bench.modes = config_dict.placeholder(tuple)
    config.bench.r_values = config_dict.placeholder(tuple)
    config.bench.schedules = config_dict.placeholder(tuple)
    return config
