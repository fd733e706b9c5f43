"""The backbone contract (vtm_jax.models.base.Backbone): every registered backbone meets it,
says how its sources are laid out and which options it reads, and a new one is one
register_backbone call away from the registry's checks, pictures and frame-count changes."""

import dataclasses

import pytest

from vtm_jax.checkpoints.frame_count import temporal_tables
from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.errors import UserError
from vtm_jax.jobs.visualize import default_layers
from vtm_jax.merging import MergingSettings
from vtm_jax.models.base import BACKBONE_OPTIONS, Backbone, SourceLayout, TemporalTable
from vtm_jax.models.registry import (
    ARCHITECTURES,
    build_model,
    check_settings_apply,
    register_backbone,
)
from vtm_jax.models.vivit import ViViT


def _record(architecture: str, **model) -> ModelRecord:
    return ModelRecord.from_json(
        {
            "architecture": architecture,
            "model": {"num_classes": 3, **model},
            "input": {"num_frames": 8, "image_size": 224},
        }
    )


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_backbone_meets_the_contract(architecture):
    model = build_model(_record(architecture))
    assert isinstance(model, Backbone)
    assert set(model.options) <= set(BACKBONE_OPTIONS)
    assert isinstance(model.source_layout(), SourceLayout)
    assert all(isinstance(t, TemporalTable) for t in model.temporal_tables(224))
    layers = getattr(model, "spatial_num_layers", None) or model.num_layers
    assert model.merging_layers() == layers


# What visualize's per-architecture if/elif said before each backbone said it itself.
LAYOUTS = {
    ("vivit", "token"): SourceLayout(False, True, (2, 16, 16), "frame"),
    ("vivit", "gap"): SourceLayout(False, False, (2, 16, 16), "frame"),
    ("videomae", None): SourceLayout(False, False, (2, 16, 16), "frame"),
    ("vivit_factorised_encoder", "token"): SourceLayout(True, True, (2, 16, 16), "frame"),
    ("vivit_factorised_encoder", "gap"): SourceLayout(True, False, (2, 16, 16), "frame"),
    ("timesformer", None): SourceLayout(True, False, (1, 16, 16), "frame"),
    ("motionformer", None): SourceLayout(True, False, (2, 16, 16), "interleaved"),
}


@pytest.mark.parametrize(("architecture", "classifier"), sorted(LAYOUTS, key=str))
def test_source_layouts(architecture, classifier):
    model = {"classifier": classifier} if classifier else {}
    got = build_model(_record(architecture, **model)).source_layout()
    assert got == LAYOUTS[architecture, classifier]


def test_motionformer_per_frame_groups_are_frame_major():
    merging = MergingSettings(motionformer_groups="per_frame")
    got = build_model(_record("motionformer"), merging).source_layout()
    assert got == SourceLayout(True, False, (2, 16, 16), "frame")


def test_merging_layers_and_the_default_pictures():
    fe = _record("vivit_factorised_encoder", spatial_num_layers=6, temporal_num_layers=2)
    assert build_model(fe).merging_layers() == 6
    assert build_model(_record("vivit", num_layers=9)).merging_layers() == 9
    assert default_layers(12) == [4, 8, 12]
    assert default_layers(2) == [1, 2]
    assert default_layers(1) == [1]


def test_options_are_declared_by_the_backbones():
    readers = {
        option: sorted(name for name, cls in ARCHITECTURES.items() if option in cls.options)
        for option in BACKBONE_OPTIONS
    }
    factorised = ["vivit_factorised_dot_product", "vivit_factorised_self_attention"]
    assert readers == {
        "temporal_r": sorted([*factorised, "vivit_factorised_encoder"]),
        "motionformer_groups": ["motionformer"],
        "motionformer_concat_keys": ["motionformer"],
        "size_weighted_pool": sorted(
            ["videomae", "vivit", *factorised, "vivit_factorised_encoder"]
        ),
        "factorised_groups": factorised,
    }


class _TinyViViT(ViViT):
    """A stand-in for an outside backbone: ViViT's contract, its own name and options."""

    options = ("size_weighted_pool", "temporal_r")


def test_register_backbone_reaches_the_registry_checks_and_frames():
    try:
        register_backbone("test_tiny_vivit", _TinyViViT)
        register_backbone("test_tiny_vivit", _TinyViViT)  # the same class again: a no-op
        record = _record("test_tiny_vivit", num_layers=2, patch_size=(2, 16, 16))
        model = build_model(record, MergingSettings(temporal_r=1))
        assert isinstance(model, _TinyViViT)
        # The registry now names it among the readers of temporal_r.
        with pytest.raises(UserError, match="temporal_r applies only to .*test_tiny_vivit"):
            check_settings_apply("vivit", MergingSettings(temporal_r=1))
        tables = temporal_tables(dataclasses.replace(record, num_frames=16))
        assert tables == [
            TemporalTable(("Transformer", "posembed_input", "pos_embedding"), 1, 14 * 14)
        ]
        with pytest.raises(ValueError, match="already registered"):
            register_backbone("test_tiny_vivit", ViViT)
    finally:
        ARCHITECTURES.pop("test_tiny_vivit", None)


def test_register_backbone_refuses_what_breaks_the_contract():
    class Lacking:
        options = ()

    with pytest.raises(TypeError, match="Flax module class"):
        register_backbone("test_lacking", Lacking)

    import flax.linen as nn

    class Bare(nn.Module):
        merging: MergingSettings = MergingSettings()

    with pytest.raises(TypeError, match="lacks token_plan, .*attention_fn"):
        register_backbone("test_bare", Bare)

    class UnknownOption(ViViT):
        options = ("temporal_r", "my_option")

    with pytest.raises(TypeError, match="unknown options my_option"):
        register_backbone("test_unknown_option", UnknownOption)
    assert not {"test_lacking", "test_bare", "test_unknown_option"} & set(ARCHITECTURES)


def test_frames_refuses_an_unknown_architecture():
    with pytest.raises(UserError, match="cannot change its frame count"):
        temporal_tables(_record("resnet"))
