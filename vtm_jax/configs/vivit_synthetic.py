r"""A ViViT checkpoint on the synthetic dataset (built on first use): a quick end-to-end eval.

  vtm-jax eval --config=configs/vivit_synthetic.py --config.checkpoint=CKPT \
      --config.dataset_configs.data_dir=out/data --config.results_path=out/synthetic.json
"""

import ml_collections
from ml_collections import config_dict

from vtm_jax.config.paper import get_paper_config


def get_config() -> ml_collections.ConfigDict:
    config = get_paper_config("vivit", "k400")
    config.experiment_name = "vivit_synthetic"
    config.dataset_name = "synthetic"
    data = config.dataset_configs
    data.split = "test"
    data.builder_options = {"frames": 16, "size": 32, "train_examples": 512, "test_examples": 128}
    data.num_classes = 8
    data.num_frames = 16
    data.stride = 1
    data.min_resize = 32
    data.crop_size = 32
    data.mean = (0.5, 0.5, 0.5)
    data.std = (0.5, 0.5, 0.5)
    config.token_merging.r = 8
    config.results_path = config_dict.placeholder(str)
    return config
