r"""The demo ViViT: trained from scratch on the synthetic dataset, shipped in vtm_jax/assets.

A small ViViT model 1 (6 layers, width 96, 3 heads) on 16 frames of 32x32, tubelets of
2x8x8: 8 x 4 x 4 = 128 patches plus a class token. The shipped checkpoint
(``vtm_jax/assets/demo_vivit``) was made by

  vtm-jax train --config=configs/vivit_demo.py --workdir=out/demo_train

and ``vtm-jax demo`` evaluates it (``token_merging`` below is the demo's operating point).
"""

import ml_collections
from ml_collections import config_dict

from vtm_jax.config.blocks import bench_config, token_merging_config, training_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment_name = "vivit_demo"
    config.model_name = "vivit_classification"
    config.rng_seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.attention_config = ml_collections.ConfigDict({"type": "spacetime"})
    config.model.hidden_size = 96
    config.model.num_heads = 3
    config.model.mlp_dim = 192
    config.model.num_layers = 6
    config.model.patches = ml_collections.ConfigDict({"size": (8, 8, 2)})  # (h, w, t)
    config.model.classifier = "token"
    config.model.representation_size = config_dict.placeholder(int)
    config.model.temporal_encoding_config = ml_collections.ConfigDict({"method": "3d_conv"})

    config.dataset_name = "synthetic"
    data = config.dataset_configs = ml_collections.ConfigDict()
    data.data_dir = "out/data"
    data.manual_dir = config_dict.placeholder(str)
    # Shapes of radius 0.25 x 32 px: with the default 0.1 (1000 steps) and 0.2 (340 steps tried)
    # this small ViT had not started learning (loss at ln 8); at 0.25 it reaches ~86% in 768.
    data.builder_options = {
        "frames": 16,
        "size": 32,
        "train_examples": 2048,
        "test_examples": 256,
        "object_scale": 0.25,
    }
    data.split = "test"
    data.num_classes = 8
    data.num_frames = 16
    data.stride = 1
    data.min_resize = 32
    data.crop_size = 32
    data.mean = (0.5, 0.5, 0.5)
    data.std = (0.5, 0.5, 0.5)
    data.test_batch_size = 64

    # Training, in Scenic's field names.
    config.optimizer = "adamw"
    config.optimizer_configs = ml_collections.ConfigDict({"weight_decay": 0.05})
    config.lr_configs = ml_collections.ConfigDict(
        {"base_learning_rate": 2e-3, "warmup_steps": 50, "end_learning_rate": 2e-5}
    )
    config.batch_size = 32
    config.num_training_epochs = 12
    config.num_training_steps = config_dict.placeholder(int)  # overrides the epochs
    config.max_grad_norm = 1.0
    config.label_smoothing = 0.0
    config.log_eval_steps = 256
    config.checkpoint_steps = 128
    config.training = training_config(attention="xla")

    # The demo's operating point and sweep.
    # r=64 is the most a step can take (half of the 128 patches): 129 -> 65 -> ... -> 3 tokens.
    config.token_merging = token_merging_config(mode="merge", r=64, threshold=None)
    config.demo = ml_collections.ConfigDict(
        {
            # The paper's five modes, then tube merging (vtm_jax/merging/tube.py).
            "modes": ("random_drop", "drop", "random_merge", "merge", "hybrid", "tube_merge"),
            "hybrid_threshold": 0.5,
            "curve_r": (8, 16, 24, 32, 48),
            "curve_modes": ("random_drop", "drop", "random_merge", "merge", "tube_merge"),
            "visualize_layers": (2, 4, 6),
            "attention": "xla",
        }
    )
    config.bench = bench_config(iterations=5, batch_size=64, attention="xla")
    config.results_path = config_dict.placeholder(str)
    return config
