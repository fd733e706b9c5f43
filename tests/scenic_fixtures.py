"""Scenic ViViT config files in Scenic's own form, for the Scenic interop tests.

The field values are those Scenic's ``scenic/projects/vivit/configs/kinetics400/`` configs
``vivit_base_k400.py`` (model 1) and ``vivit_base_factorised_encoder.py`` (model 2) set, at
Scenic commit 4a38d47, written out here as facts (no Scenic code): the files import
``ml_collections`` (and, like Scenic's model-1 file, ``absl.logging``), define
``get_config()``, set ``checkpoint = True`` and the typo'd ``datset_configs``, and have no
``token_merging`` block.

Scenic ships no config file for models 3 (``factorized_self_attention_block``) and 4
(``factorized_dot_product_attention``): theirs here are the model-1 file with the attention
type Scenic's ``ViViT`` reads for them, model 3's ``attention_order`` and the ``gap``
classifier (Scenic's ViViT asserts there is no class token for these types).
"""

from __future__ import annotations

from pathlib import Path

K400_TRAIN, K400_VAL, K400_TEST = 214834, 17637, 34579

_HEAD = """
from absl import logging
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.experiment_name = {experiment!r}
  config.dataset_name = 'video_tfrecord_dataset'
  config.dataset_configs = ml_collections.ConfigDict()
  config.data_dtype_str = 'float32'
  config.datset_configs = ml_collections.ConfigDict()
  config.dataset_configs.base_dir = '/path/to/dataset'
  config.dataset_configs.tables = {{
      'train': 'train.tfrecord@1024',
      'validation': 'validation.tfrecord@1024',
      'test': 'test.tfrecord@1024',
  }}
  config.dataset_configs.examples_per_subset = {{
      'train': {train}, 'validation': {val}, 'test': {test}}}
  config.dataset_configs.num_classes = 400
  config.dataset_configs.num_frames = 32
  config.dataset_configs.stride = 2
  config.dataset_configs.min_resize = 256
  config.dataset_configs.crop_size = 224
  config.dataset_configs.one_hot_labels = True
  config.dataset_configs.zero_centering = True
  config.dataset_configs.do_multicrop_test = True
  config.dataset_configs.log_test_epochs = 5
  config.dataset_configs.num_test_clips = 4
  config.dataset_configs.test_batch_size = 8
  config.dataset_configs.do_three_spatial_crops = True
  config.multicrop_clips_per_device = 2
  config.dataset_configs.augmentation_params = ml_collections.ConfigDict()
  aug = config.dataset_configs.augmentation_params
  aug.do_jitter_scale = True
  aug.scale_min_factor = 0.9
  aug.scale_max_factor = 1.33
  aug.prob_scale_jitter = 1.0
  aug.do_color_augment = True
  aug.prob_color_augment = 0.8
  aug.prob_color_drop = 0.1
  config.dataset_configs.prefetch_to_device = 2

  config.model_name = 'vivit_classification'
  config.model = ml_collections.ConfigDict()
  config.model.attention_config = ml_collections.ConfigDict()
  config.model.attention_config.type = {attention!r}
  config.model.hidden_size = 768
  config.model.patches = ml_collections.ConfigDict()
"""

_MODEL1 = """
  config.model.num_heads = 12
  config.model.mlp_dim = 3072
  config.model.num_layers = 12
"""

_MODEL2 = """
  config.model.spatial_transformer = ml_collections.ConfigDict()
  config.model.spatial_transformer.num_heads = 12
  config.model.spatial_transformer.mlp_dim = 3072
  config.model.spatial_transformer.num_layers = 12
  config.model.temporal_transformer = ml_collections.ConfigDict()
  config.model.temporal_transformer.num_heads = 12
  config.model.temporal_transformer.mlp_dim = 3072
  config.model.temporal_transformer.num_layers = 4
"""

_TAIL = """
  config.model.representation_size = None
  config.model.classifier = {classifier!r}
  config.model.attention_dropout_rate = 0.
  config.model.dropout_rate = 0.
  config.model_dtype_str = 'float32'
  config.model.temporal_encoding_config = ml_collections.ConfigDict()
  config.model.temporal_encoding_config.method = '3d_conv'
  config.model.patches.size = (16, 16, 2)
  config.model.temporal_encoding_config.kernel_init_method = 'central_frame_initializer'
{extra_model}
  config.trainer_name = 'vivit_trainer'
  config.optimizer = 'momentum'
  config.optimizer_configs = ml_collections.ConfigDict()
  config.l2_decay_factor = 0
  config.max_grad_norm = 1
  config.label_smoothing = None
  config.num_training_epochs = 30
  config.batch_size = 64
  config.rng_seed = 0

  config.init_from = ml_collections.ConfigDict()
  config.init_from.model_config = None
  config.init_from.checkpoint_path = 'path_to_checkpoint_of_vit_b_16'
  config.init_from.checkpoint_format = 'scenic'
  config.init_from.model_config = ml_collections.ConfigDict()
  config.init_from.model_config.model = ml_collections.ConfigDict()
  config.init_from.model_config.model.classifier = 'token'
  config.init_from.restore_positional_embedding = True
  config.init_from.restore_input_embedding = True
  config.init_from.positional_embed_size_change = 'tile'

  steps_per_epoch = {train} // config.batch_size
  total_steps = config.num_training_epochs * steps_per_epoch
  config.lr_configs = ml_collections.ConfigDict()
  config.lr_configs.learning_rate_schedule = 'compound'
  config.lr_configs.factors = 'constant * cosine_decay * linear_warmup'
  config.lr_configs.warmup_steps = int(2.5 * steps_per_epoch)
  config.lr_configs.steps_per_cycle = total_steps
  config.lr_configs.base_learning_rate = {lr}

  config.write_summary = True
  config.checkpoint = True
  config.debug_train = False
  config.debug_eval = False
{extra_tail}
  return config
"""


FACTORISED_TYPES = {
    3: "factorized_self_attention_block",
    4: "factorized_dot_product_attention",
}


def scenic_k400_config_text(model: int, order: str = "time_space") -> str:
    """The text of a K400 ViViT-B config file in Scenic's form: model 1, 2, 3 or 4
    (``order``: model 3's ``attention_order``)."""
    sizes = {"train": K400_TRAIN, "val": K400_VAL, "test": K400_TEST}
    if model in FACTORISED_TYPES:
        head = _HEAD.format(
            experiment=f"vivit_base_kinetics400_model{model}",
            attention=FACTORISED_TYPES[model],
            **sizes,
        )
        extra = f"  config.model.attention_config.attention_order = {order!r}" if model == 3 else ""
        tail = _TAIL.format(
            extra_model=extra, extra_tail="", lr=0.1, train=K400_TRAIN, classifier="gap"
        )
        return head + _MODEL1 + tail
    if model == 1:
        head = _HEAD.format(
            experiment="vivit_base_kinetics400_im21k", attention="spacetime", **sizes
        )
        tail = _TAIL.format(
            extra_model="", extra_tail="", lr=0.1, train=K400_TRAIN, classifier="token"
        )
        return head + _MODEL1 + tail
    head = _HEAD.format(
        experiment="vivit_kinetics400_classification", attention="factorized_encoder", **sizes
    )
    tail = _TAIL.format(
        extra_model="  config.model.temporal_encoding_config.n_sampled_frames = 16",
        extra_tail="  config.checkpoint_steps = 1000",
        lr=0.05,
        train=K400_TRAIN,
        classifier="token",
    )
    return head + _MODEL2 + tail


def write_scenic_config(directory: Path, model: int, order: str = "time_space") -> Path:
    """Write the K400 config file of model 1, 2, 3 or 4 into ``directory``; its path."""
    suffix = f"_{order}" if model == 3 else ""
    path = Path(directory) / f"scenic_vivit_k400_model{model}{suffix}.py"
    path.write_text(scenic_k400_config_text(model, order))
    return path


# Overrides that shrink either config to a tiny model (the config file stays as it is).
TINY_MODEL1 = [
    "--config.model.hidden_size=16",
    "--config.model.num_heads=2",
    "--config.model.mlp_dim=32",
    "--config.model.num_layers=1",
]
TINY_MODEL3 = TINY_MODEL1  # models 3 and 4 have model 1's fields
TINY_MODEL4 = TINY_MODEL1
TINY_MODEL2 = [
    "--config.model.hidden_size=16",
    *[
        f"--config.model.{part}_transformer.{field}={value}"
        for part in ("spatial", "temporal")
        for field, value in (("num_heads", 2), ("mlp_dim", 32), ("num_layers", 1))
    ],
]
