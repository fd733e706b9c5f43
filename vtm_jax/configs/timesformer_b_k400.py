r"""TimeSformer-B (divided space-time, 8x224x224) on Kinetics-400: the paper's protocol at its r, mode merge.

  vtm-jax eval --config=configs/timesformer_b_k400.py --config.checkpoint=CKPT \
      --config.dataset_configs.data_dir=DATA --config.dataset_configs.manual_dir=FILES
  vtm-jax bench --config=configs/timesformer_b_k400.py

Every experiment family of the paper is an override, e.g. --config.token_merging.mode=drop,
--config.token_merging.schedule=-1 or --config.token_merging.duplicate="(11, 12)".
"""

from vtm_jax.config.paper import get_paper_config


def get_config():
    return get_paper_config("timesformer", "k400")
