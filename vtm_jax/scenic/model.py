"""A Scenic model class whose Flax module is vtm_jax's ViViT with token merging.

With Scenic installed (``pip install "vtm-jax[scenic]"``), :class:`ViViTTokenMergingModel`
subclasses Scenic's ``ClassificationModel``, so Scenic's current generic trainer and evaluator
(``scenic.train_lib.classification_trainer``) can train and evaluate it from a Scenic ViViT
config plus a ``token_merging`` block (the fields of :class:`vtm_jax.merging.MergingSettings`;
none means no merging). The module's parameter tree is Scenic's ViViT's, so Scenic checkpoints
and ``init_from`` work unchanged. ``python -m vtm_jax.scenic.model --config=... --workdir=...``
runs Scenic's classification trainer with it, as a Scenic project's ``main.py`` would.

Without Scenic this module still imports: :data:`SCENIC_AVAILABLE` is False and building
the model class raises an ImportError saying how to install Scenic. The Flax modules
(:class:`ScenicViViT`, :class:`ScenicFactorisedEncoderViViT`, and models 3 and 4:
:class:`ScenicFactorisedSelfAttentionViViT`, :class:`ScenicFactorisedDotProductViViT`) and
:func:`flax_model_from_config` need no Scenic.
"""

from __future__ import annotations

import copy
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from vtm_jax.merging import MergingSettings
from vtm_jax.models.base import MERGE_STREAM
from vtm_jax.models.vivit import ViViT
from vtm_jax.models.vivit_factorised import FactorisedDotProductViViT, FactorisedSelfAttentionViViT
from vtm_jax.models.vivit_fe import FactorisedEncoderViViT

try:
    from scenic.model_lib.base_models import classification_model as _classification_model

    SCENIC_AVAILABLE = True
    _SCENIC_IMPORT_ERROR: ImportError | None = None
except ImportError as error:  # Scenic is an optional extra
    _classification_model = None
    SCENIC_AVAILABLE = False
    _SCENIC_IMPORT_ERROR = error

INSTALL_HINT = (
    'Scenic is not installed: pip install "vtm-jax[scenic]" (Scenic from its git repository)'
)


def training_merge_rng(
    module: nn.Module, train: bool, merge_rng: jax.Array | None
) -> jax.Array | None:
    """Scenic's trainer passes only ``rngs={"dropout": ...}``, a new key each step: in training,
    with no ``merge_rng`` and no ``'merge'`` stream, that key draws the merges, so each step
    merges anew (these modules have no dropout to share it with). Otherwise ``merge_rng``, which
    the backbone resolves as ever (:func:`vtm_jax.models.base.merge_key`); evaluation, which
    Scenic runs without rngs, keeps the seeded default."""
    if merge_rng is None and train and not module.has_rng(MERGE_STREAM):
        if module.has_rng("dropout"):
            return module.make_rng("dropout")
    return merge_rng


class ScenicViViT(ViViT):
    """vtm_jax's ViViT called as Scenic calls its modules: ``apply(v, x, train=..., debug=...)``."""

    def __call__(
        self,
        video: jax.Array,
        *,
        train: bool = False,
        debug: bool = False,
        merge_rng: jax.Array | None = None,
    ) -> jax.Array:
        del debug
        merge_rng = training_merge_rng(self, train, merge_rng)
        return super().__call__(video, train=train, merge_rng=merge_rng)


class ScenicFactorisedEncoderViViT(FactorisedEncoderViViT):
    """vtm_jax's factorised-encoder ViViT (Scenic's model 2) with Scenic's call signature."""

    def __call__(
        self,
        video: jax.Array,
        *,
        train: bool = False,
        debug: bool = False,
        merge_rng: jax.Array | None = None,
    ) -> jax.Array:
        del debug
        merge_rng = training_merge_rng(self, train, merge_rng)
        return super().__call__(video, train=train, merge_rng=merge_rng)


class ScenicFactorisedSelfAttentionViViT(FactorisedSelfAttentionViViT):
    """vtm_jax's ViViT model 3 (factorised self-attention) with Scenic's call signature."""

    def __call__(
        self,
        video: jax.Array,
        *,
        train: bool = False,
        debug: bool = False,
        merge_rng: jax.Array | None = None,
    ) -> jax.Array:
        del debug
        merge_rng = training_merge_rng(self, train, merge_rng)
        return super().__call__(video, train=train, merge_rng=merge_rng)


class ScenicFactorisedDotProductViViT(FactorisedDotProductViViT):
    """vtm_jax's ViViT model 4 (factorised dot-product attention) with Scenic's call signature."""

    def __call__(
        self,
        video: jax.Array,
        *,
        train: bool = False,
        debug: bool = False,
        merge_rng: jax.Array | None = None,
    ) -> jax.Array:
        del debug
        merge_rng = training_merge_rng(self, train, merge_rng)
        return super().__call__(video, train=train, merge_rng=merge_rng)


# The Scenic-signature module of each architecture a Scenic ViViT config can describe.
SCENIC_MODULES: dict[str, type[nn.Module]] = {
    "vivit": ScenicViViT,
    "vivit_factorised_encoder": ScenicFactorisedEncoderViViT,
    "vivit_factorised_self_attention": ScenicFactorisedSelfAttentionViViT,
    "vivit_factorised_dot_product": ScenicFactorisedDotProductViViT,
}


def flax_model_from_config(
    config: ml_collections.ConfigDict, num_classes: int | None = None
) -> nn.Module:
    """The Flax module a Scenic ViViT config (plus ``token_merging``) describes.

    ``num_classes`` defaults to ``config.dataset_configs.num_classes``. A non-zero dropout rate
    or a dtype other than float32 is an error (:func:`vtm_jax.config.scenic.check_no_dropout`).
    """
    from vtm_jax.checkpoints.convert.scenic import SCENIC_GELU_APPROXIMATE, SCENIC_LAYER_NORM_EPS
    from vtm_jax.config.scenic import check_float32, check_no_dropout, vivit_record
    from vtm_jax.models.attention import get_attention
    from vtm_jax.models.registry import check_settings_apply

    check_no_dropout(config)
    check_float32(config, ("model_dtype_str",))  # the input's dtype is Scenic's loader's
    if num_classes is not None:
        config = copy.deepcopy(config)
        with config.unlocked():
            if "dataset_configs" not in config:
                config.dataset_configs = ml_collections.ConfigDict()
            config.dataset_configs.num_classes = num_classes
    record = vivit_record(config)
    merging = MergingSettings.from_dict(config.get("token_merging"))
    check_settings_apply(record.architecture, merging)
    module = SCENIC_MODULES[record.architecture]
    return module(
        **record.model_kwargs(),
        layer_norm_eps=SCENIC_LAYER_NORM_EPS,
        gelu_approximate=SCENIC_GELU_APPROXIMATE,
        merging=merging,
        attention_fn=get_attention(config.get("bench", {}).get("attention", "auto")),
    )


def _default_config() -> ml_collections.ConfigDict:
    """A small spatio-temporal ViViT config in Scenic's schema, for Scenic's test utilities."""
    from vtm_jax.config.blocks import token_merging_config

    config = ml_collections.ConfigDict()
    config.model_name = "vivit_classification"
    config.model_dtype_str = "float32"
    config.model = ml_collections.ConfigDict(
        {
            "attention_config": {"type": "spacetime"},
            "hidden_size": 16,
            "num_heads": 2,
            "mlp_dim": 32,
            "num_layers": 1,
            "patches": {"size": (4, 4, 2)},
            "classifier": "token",
            "representation_size": None,
            "temporal_encoding_config": {"method": "3d_conv"},
            "dropout_rate": 0.0,
            "attention_dropout_rate": 0.0,
        }
    )
    config.dataset_configs = ml_collections.ConfigDict({"num_classes": 10})
    config.token_merging = token_merging_config()
    return config


if SCENIC_AVAILABLE:

    class ViViTTokenMergingModel(_classification_model.ClassificationModel):
        """Scenic's ViViT classification model, built on vtm_jax's ViViT with token merging.

        Softmax cross-entropy and Scenic's classification metrics come from Scenic's base
        class; ``config.token_merging`` sets the reduction (absent: none).
        """

        def build_flax_model(self) -> nn.Module:
            return flax_model_from_config(
                self.config, num_classes=self.dataset_meta_data["num_classes"]
            )

        def default_flax_model_config(self) -> ml_collections.ConfigDict:
            return _default_config()

else:

    class ViViTTokenMergingModel:  # type: ignore[no-redef]
        """Placeholder: the model class needs Scenic (see :data:`INSTALL_HINT`)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError(INSTALL_HINT) from _SCENIC_IMPORT_ERROR


def main(rng: jax.Array, config: ml_collections.ConfigDict, workdir: str, writer: Any) -> None:
    """Scenic's generic classification trainer with :class:`ViViTTokenMergingModel`."""
    if not SCENIC_AVAILABLE:
        raise ImportError(INSTALL_HINT) from _SCENIC_IMPORT_ERROR
    from scenic.projects.vivit.data import video_tfrecord_dataset  # noqa: F401 (registers it)
    from scenic.train_lib import classification_trainer, train_utils

    data_rng, rng = jax.random.split(rng)
    dataset = train_utils.get_dataset(config, data_rng)
    classification_trainer.train(
        rng=rng,
        config=config,
        model_cls=ViViTTokenMergingModel,
        dataset=dataset,
        workdir=workdir,
        writer=writer,
    )


def run() -> None:
    """``python -m vtm_jax.scenic.model --config=... --workdir=...``: Scenic's app with :func:`main`."""
    if not SCENIC_AVAILABLE:
        raise SystemExit(INSTALL_HINT)
    from scenic import app

    app.run(main=main)


if __name__ == "__main__":
    run()
