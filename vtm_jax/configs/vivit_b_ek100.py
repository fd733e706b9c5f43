r"""ViViT-B/16x2 (joint space-time, 32x224x224) on EPIC-KITCHENS-100 (verb and noun heads): the paper's protocol at its r, mode merge.

  vtm-jax eval --config=configs/vivit_b_ek100.py --config.checkpoint=CKPT \
      --config.dataset_configs.data_dir=DATA --config.dataset_configs.manual_dir=FILES
  vtm-jax bench --config=configs/vivit_b_ek100.py

Every experiment family of the paper is an override, e.g. --config.token_merging.mode=drop,
--config.token_merging.schedule=-1 or --config.token_merging.duplicate="(11, 12)".
"""

from vtm_jax.config.paper import get_paper_config


def get_config():
    return get_paper_config("vivit", "ek100")
