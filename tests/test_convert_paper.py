"""`vtm-jax convert` on the paper's checkpoint files, as they are.

Each file is fabricated with its original top-level structure and key layout (SlowFast
``{'epoch', 'model_state', 'optimizer_state', 'cfg'}``; MCG-NJU ``{'module'}`` / ``{'model'}``;
the original TimeSformer and VideoMAE key names written out here, independently of the
converter), saved with ``torch.save``, converted through the CLI, and the converted model's
logits are compared with a torch model holding the same weights: the HF models whose tensors
the original ones are, or the reference Motionformer.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from vtm_jax.checkpoints.store import load_checkpoint
from vtm_jax.cli import main
from vtm_jax.models.attention import get_attention
from vtm_jax.models.registry import build_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

FRAMES, SIZE, PATCH = 4, 32, 8  # 2 x 4 x 4 tubelets, or 4 frames of 16 patches
EPIC = [97, 300]  # EPIC-KITCHENS verb and noun classes


# ---------------------------------------------------------------------------------------------
# Small random torch models (every parameter redrawn so that a dropped or misplaced one shows)


def redraw(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.startswith("classifier"):
                param.copy_(noise)  # O(1) logits: 1e-4 is a tight tolerance
            elif "embeddings." in name and "projection" not in name:
                param.copy_(0.5 * noise)  # class token, position and time tables
            elif param.ndim > 1:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.2 * noise)
    return model.eval()


def hf_vivit(labels):
    """4 heads of 16: the head count must come from --num-heads."""
    config = transformers.VivitConfig(
        image_size=SIZE,
        num_frames=FRAMES,
        tubelet_size=[2, PATCH, PATCH],
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        hidden_act="gelu_fast",  # the paper's ViViT config
        layer_norm_eps=1e-6,
        num_labels=labels,
        attn_implementation="eager",
    )
    return redraw(transformers.VivitForVideoClassification(config), seed=1)


def hf_timesformer(labels):
    """2 heads of 64: the default head count for the width."""
    config = transformers.TimesformerConfig(
        image_size=SIZE,
        patch_size=PATCH,
        num_frames=FRAMES,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=160,
        num_labels=labels,
    )
    return redraw(transformers.TimesformerForVideoClassification(config), seed=2)


def hf_videomae(labels):
    """The original VideoMAE: LayerNorm eps 1e-6 everywhere, fc_norm included."""
    config = transformers.VideoMAEConfig(
        image_size=SIZE,
        patch_size=PATCH,
        num_frames=FRAMES,
        tubelet_size=2,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=160,
        layer_norm_eps=1e-6,
        num_labels=labels,
        attn_implementation="eager",
    )
    model = transformers.VideoMAEForVideoClassification(config)
    model.fc_norm.eps = 1e-6  # transformers builds it with PyTorch's 1e-5
    return redraw(model, seed=3)


def video(seed=0):
    """A clip ``[B, T, C, H, W]`` (HF's pixel_values layout)."""
    clip = np.random.default_rng(seed).standard_normal((2, FRAMES, 3, SIZE, SIZE))
    return torch.from_numpy(clip.astype(np.float32))


def hf_logits(model, clip):
    with torch.no_grad():
        return model(pixel_values=clip).logits.numpy()


# ---------------------------------------------------------------------------------------------
# The original layouts, written out here


def on_disk(model, tmp_path):
    """HF's on-disk key names (what transformers 4 also used in memory)."""
    model.save_pretrained(tmp_path / "hf")
    return safetensors_torch.load_file(tmp_path / "hf" / "model.safetensors")


def split_classifier(state, names, splits, prefix="classifier"):
    """One ``prefix`` head of sum(splits) classes as separate heads ``names`` (EPIC-KITCHENS)."""
    state = dict(state)
    weight, bias = state.pop(f"{prefix}.weight"), state.pop(f"{prefix}.bias")
    for name, w, b in zip(names, weight.split(splits), bias.split(splits), strict=True):
        state[f"{name}.weight"], state[f"{name}.bias"] = w.clone(), b.clone()
    return state


# HF TimeSformer name -> the original TimeSformer's, applied in order.
TIMESFORMER_NAMES = [
    ("timesformer.embeddings.cls_token", "cls_token"),
    ("timesformer.embeddings.position_embeddings", "pos_embed"),
    ("timesformer.embeddings.time_embeddings", "time_embed"),
    ("timesformer.embeddings.patch_embeddings.projection", "patch_embed.proj"),
    ("timesformer.encoder.layer.", "blocks."),
    ("temporal_layernorm", "temporal_norm1"),
    ("temporal_attention.attention.qkv", "temporal_attn.qkv"),
    ("temporal_attention.output.dense", "temporal_attn.proj"),
    ("temporal_dense", "temporal_fc"),
    ("attention.attention.qkv", "attn.qkv"),
    ("attention.output.dense", "attn.proj"),
    ("layernorm_before", "norm1"),
    ("layernorm_after", "norm2"),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
    ("timesformer.layernorm", "norm"),
    ("classifier", "head"),
]
TIMESFORMER_BLOCK = [
    "norm1",
    "attn.qkv",
    "attn.proj",
    "temporal_norm1",
    "temporal_attn.qkv",
    "temporal_attn.proj",
    "temporal_fc",
    "norm2",
    "mlp.fc1",
    "mlp.fc2",
]
TIMESFORMER_TOP = ["cls_token", "pos_embed", "time_embed", "patch_embed.proj", "norm", "head"]


def rename(key, names):
    for old, new in names:
        key = key.replace(old, new)
    return key


def original_timesformer(model):
    """The TimeSformer release's ``model_state``: every key under ``model.``."""
    state = {rename(k, TIMESFORMER_NAMES): v for k, v in model.state_dict().items()}
    expected = {f"blocks.0.{m}.{p}" for m in TIMESFORMER_BLOCK for p in ("weight", "bias")}
    assert {k for k in state if k.startswith("blocks.0.")} == expected
    top = {k.split(".weight")[0].split(".bias")[0] for k in state if not k.startswith("blocks.")}
    assert top == set(TIMESFORMER_TOP)
    return {f"model.{k}": v for k, v in state.items()}


VIDEOMAE_NAMES = [
    ("videomae.embeddings.patch_embeddings.projection", "patch_embed.proj"),
    ("videomae.encoder.layer.", "blocks."),
    ("attention.attention.query.bias", "attn.q_bias"),
    ("attention.attention.value.bias", "attn.v_bias"),
    ("attention.output.dense", "attn.proj"),
    ("layernorm_before", "norm1"),
    ("layernorm_after", "norm2"),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
    ("classifier", "head"),
]


def original_videomae(model):
    """MCG-NJU's fine-tuned keys: fused bias-free ``qkv``, ``q_bias`` / ``v_bias``, unprefixed."""
    hf = model.state_dict()
    state = {}
    for key, value in hf.items():
        if ".attention.attention." in key and key.endswith(("query.weight", "key.weight")):
            continue
        if key.endswith("attention.attention.value.weight"):
            layer = key.split(".")[3]
            parts = [hf[key.replace("value.weight", f"{p}.weight")] for p in ("query", "key")]
            state[f"blocks.{layer}.attn.qkv.weight"] = torch.cat([*parts, value])
            continue
        state[rename(key, VIDEOMAE_NAMES)] = value
    block = {
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias",
        "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    }  # fmt: skip
    assert {k for k in state if k.startswith("blocks.0.")} == {f"blocks.0.{k}" for k in block}
    return state


def optimizer_state():
    """What SGD with momentum stores (tensors and plain values only)."""
    return {
        "state": {0: {"momentum_buffer": torch.zeros(3)}},
        "param_groups": [{"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "params": [0]}],
    }


def save_slowfast(path, state, cfg=None):
    """As SlowFast's save_checkpoint writes: epoch, model_state, optimizer_state, cfg (YAML)."""
    torch.save(
        {
            "epoch": 5,
            "model_state": dict(state),
            "optimizer_state": optimizer_state(),
            "cfg": yaml.safe_dump(cfg or {}),
        },
        path,
    )
    return path


def data_cfg(**extra):
    return {"DATA": {"NUM_FRAMES": FRAMES, "TRAIN_CROP_SIZE": SIZE, **extra}}


# ---------------------------------------------------------------------------------------------
# Converting through the CLI and running the result


def convert(tmp_path, source, path, *flags):
    out = tmp_path / "converted"
    assert (
        main(["convert", "--source", source, "--input", str(path), "--output", str(out), *flags])
        == 0
    )
    params, record = load_checkpoint(str(out))
    assert record.converted_from == {"source": source, "path": str(path)}
    return params, record


def our_logits(params, record, clip):
    model = build_model(record, attention_fn=get_attention("xla"))
    nthwc = jnp.asarray(clip.numpy().transpose(0, 1, 3, 4, 2))
    return np.asarray(model.apply({"params": params}, nthwc))


def one_line_error(capsys, args, *expected):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vtm-jax: error:") and "\n" not in err, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


# ---------------------------------------------------------------------------------------------
# ViViT: the paper's fine-tunes (HF keys inside SlowFast's model_state)


def test_paper_vivit(tmp_path):
    model = hf_vivit(labels=6)
    cfg = data_cfg(
        SAMPLING_RATE=1,
        MEAN=[0.45, 0.45, 0.45],
        STD=[0.225, 0.225, 0.225],
        TRAIN_JITTER_SCALES=[36, 40],
    )
    cfg |= {"MODEL": {"MODEL_NAME": "ViViT"}, "VIVIT": {"CONFIG_PATH": "tome_vivit.json"}}
    path = save_slowfast(tmp_path / "vivit.pyth", on_disk(model, tmp_path), cfg)
    params, record = convert(tmp_path, "slowfast", path, "--num-heads", "4")
    assert record.architecture == "vivit"
    assert record.input == {"num_frames": FRAMES, "image_size": SIZE}
    assert record.model["num_heads"] == 4 and record.model["gelu_approximate"] is True
    assert record.preprocessing == {
        "num_frames": FRAMES,
        "stride": 1,
        "min_resize": 36,
        "crop_size": SIZE,
        "mean": [0.45, 0.45, 0.45],
        "std": [0.225, 0.225, 0.225],
        "sampling": "stride",
        "protocol": "paper",  # the paper's Kinetics test loader, read as it reads videos
        "paper_loader": "kinetics",
    }
    assert record.class_splits is None and record.labels is None
    clip = video(seed=1)
    np.testing.assert_allclose(our_logits(params, record, clip), hf_logits(model, clip), atol=1e-4)


def test_paper_vivit_epic_two_heads(tmp_path):
    """verb_classifier / noun_classifier become one head of 97 + 300 classes."""
    model = hf_vivit(labels=sum(EPIC))
    # transformers 5's in-memory names this time; the cfg gives no sampling rate or mean / std.
    state = split_classifier(model.state_dict(), ["verb_classifier", "noun_classifier"], EPIC)
    path = save_slowfast(tmp_path / "vivit_ek.pyth", state, data_cfg())
    params, record = convert(tmp_path, "slowfast", path, "--num-heads", "4")
    assert record.class_splits == EPIC
    assert record.model["num_classes"] == sum(EPIC)
    prep = record.preprocessing
    assert (prep["stride"], prep["mean"], prep["std"]) == (2, [0.45] * 3, [0.225] * 3)
    assert prep["min_resize"] == round(SIZE * 256 / 224)
    clip = video(seed=2)
    np.testing.assert_allclose(our_logits(params, record, clip), hf_logits(model, clip), atol=1e-4)


def test_flags_override_the_cfg_and_bare_state_dicts_load(tmp_path):
    """A cfg with the wrong input size is overridden by the flags; a bare HF state dict loads."""
    model = hf_vivit(labels=5)
    cfg_path = save_slowfast(tmp_path / "a.pyth", on_disk(model, tmp_path), data_cfg())
    checkpoint = torch.load(cfg_path, weights_only=True)
    checkpoint["cfg"] = yaml.safe_dump({"DATA": {"NUM_FRAMES": 16, "TRAIN_CROP_SIZE": 224}})
    torch.save(checkpoint, cfg_path)
    flags = ["--num-heads", "4", "--num-frames", str(FRAMES), "--image-size", str(SIZE)]
    params, record = convert(tmp_path, "slowfast", cfg_path, *flags)
    assert record.input == {"num_frames": FRAMES, "image_size": SIZE}
    bare = tmp_path / "pytorch_model.bin"
    torch.save(model.state_dict(), bare)
    params_bare, _ = convert(tmp_path / "b", "slowfast", bare, *flags)
    clip = video(seed=3)
    expected = hf_logits(model, clip)
    np.testing.assert_allclose(our_logits(params, record, clip), expected, atol=1e-4)
    np.testing.assert_allclose(our_logits(params_bare, record, clip), expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# TimeSformer: the original release and the paper's EPIC-KITCHENS fine-tune


def test_timesformer_release(tmp_path):
    model = hf_timesformer(labels=10)
    cfg = data_cfg(SAMPLING_RATE=32, TRAIN_JITTER_SCALES=[40, 48])
    cfg |= {"TIMESFORMER": {"ATTENTION_TYPE": "divided_space_time"}}
    path = save_slowfast(
        tmp_path / "TimeSformer_divST_8x32_224_K400.pyth", original_timesformer(model), cfg
    )
    params, record = convert(tmp_path, "slowfast", path)
    assert record.architecture == "timesformer"
    assert record.model["num_heads"] == 2 and record.model["gelu_approximate"] is False
    assert record.input == {"num_frames": FRAMES, "image_size": SIZE}
    prep = record.preprocessing
    assert (prep["stride"], prep["min_resize"], prep["mean"]) == (32, 40, [0.45] * 3)
    clip = video(seed=4)
    np.testing.assert_allclose(our_logits(params, record, clip), hf_logits(model, clip), atol=1e-4)


def test_timesformer_epic_two_heads(tmp_path):
    model = hf_timesformer(labels=8)
    state = split_classifier(
        original_timesformer(model), ["model.head0", "model.head1"], [3, 5], "model.head"
    )
    path = save_slowfast(tmp_path / "ts_ek.pyth", state, data_cfg())
    params, record = convert(tmp_path, "slowfast", path)
    assert record.class_splits == [3, 5]
    clip = video(seed=5)
    np.testing.assert_allclose(our_logits(params, record, clip), hf_logits(model, clip), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# VideoMAE: MCG-NJU's fine-tuned .pth and the paper's EPIC-KITCHENS wrapper


@pytest.fixture(scope="module")
def videomae():
    model = hf_videomae(labels=7)
    return model, original_videomae(model)


@pytest.mark.parametrize("wrapper", ["module", "model", "bare"])
def test_mcg_nju_videomae(tmp_path, videomae, wrapper):
    model, state = videomae
    path = tmp_path / "vit_b_k400_ft.pth"
    torch.save(state if wrapper == "bare" else {wrapper: state}, path)
    flags = ["--num-frames", str(FRAMES), "--image-size", str(SIZE)]  # no pos_embed, no cfg
    params, record = convert(tmp_path, "videomae", path, *flags)
    assert record.architecture == "videomae"
    assert record.model["fc_norm_eps"] == 1e-6 and record.model["layer_norm_eps"] == 1e-6
    assert record.token_merging["prop_attn"] is False  # as every VideoMAE run of the paper
    prep = record.preprocessing
    assert (prep["stride"], prep["mean"], prep["std"]) == (
        1,
        [0.485, 0.456, 0.406],
        [0.229, 0.224, 0.225],
    )
    clip = video(seed=6)
    np.testing.assert_allclose(our_logits(params, record, clip), hf_logits(model, clip), atol=1e-4)


def test_paper_videomae_epic_two_heads(tmp_path):
    model = hf_videomae(labels=8)
    state = split_classifier(original_videomae(model), ["head0", "head1"], [3, 5], "head")
    state = {f"model.{k}": v for k, v in state.items()}  # the paper's VideoMAE wrapper
    cfg = data_cfg(SAMPLING_RATE=2, MEAN=[0.485, 0.456, 0.406], STD=[0.229, 0.224, 0.225])
    path = save_slowfast(
        tmp_path / "videomae_ek.pyth", state, cfg | {"VIDEOMAE": {"TUBELET_SIZE": 2}}
    )
    params, record = convert(tmp_path, "slowfast", path)
    assert record.class_splits == [3, 5]
    assert record.input == {"num_frames": FRAMES, "image_size": SIZE}  # from the cfg
    assert record.preprocessing["stride"] == 2
    clip = video(seed=7)
    np.testing.assert_allclose(our_logits(params, record, clip), hf_logits(model, clip), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Motionformer through --source slowfast (the paper's MOTIONFORMER cfg section)


@pytest.mark.parametrize("source", ["slowfast", "motionformer"])
def test_paper_motionformer_epic_two_heads(tmp_path, source):
    """Through --source slowfast with the paper's cfg, and as a bare state dict (no cfg) through
    --source motionformer, whose head count then comes from --num-heads."""
    from tests.reference.torch_motionformer import TorchMotionformer, randomise

    model = TorchMotionformer(
        num_classes=[3, 5], dim=64, depth=2, heads=4, img_size=SIZE, patch=PATCH, slots=FRAMES // 2
    )
    model = randomise(model, seed=4)
    path = tmp_path / "mf_ek.pyth"
    if source == "slowfast":
        cfg = data_cfg(SAMPLING_RATE=4, MEAN=[0.5] * 3, STD=[0.5] * 3)
        cfg |= {"MOTIONFORMER": {"NUM_HEADS": 4, "USE_MLP": True, "ATTN_LAYER": "trajectory"}}
        save_slowfast(path, model.state_dict(), cfg)
        params, record = convert(tmp_path, source, path)
    else:
        torch.save(model.state_dict(), path)
        params, record = convert(tmp_path, source, path, "--num-heads", "4")
    assert record.architecture == "motionformer" and record.class_splits == [3, 5]
    assert record.model["num_heads"] == 4
    clip = video(seed=8)
    with torch.no_grad():
        expected = model.logits(clip.permute(0, 2, 1, 3, 4)).numpy()  # [B, C, T, H, W]
    np.testing.assert_allclose(our_logits(params, record, clip), expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Refusals: one line each


class _Pickled:  # any class: torch.load(weights_only=True) refuses to rebuild it
    pass


def test_unsafe_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "unsafe.pyth"
    torch.save({"model_state": {}, "cfg": _Pickled()}, path)
    args = [
        "convert",
        "--source",
        "slowfast",
        "--input",
        str(path),
        "--output",
        str(tmp_path / "o"),
    ]
    one_line_error(capsys, args, "pickles tests.test_convert_paper._Pickled", "weights_only=True")
    assert not (tmp_path / "o").exists()


def _timesformer_file(tmp_path, edit):
    state = original_timesformer(hf_timesformer(labels=4))
    edit(state)
    return save_slowfast(tmp_path / "edited.pyth", state, data_cfg())


@pytest.mark.parametrize(
    "edit,expected",
    [
        (
            lambda s: s.pop("model.blocks.1.temporal_fc.weight"),
            "missing blocks.1.temporal_fc.weight",
        ),
        (
            lambda s: s.update({"model.blocks.0.attn.extra": torch.zeros(2)}),
            "unknown blocks.0.attn.extra",
        ),
        (
            lambda s: s.update({"model.time_embed": torch.zeros(1, 3, 128)}),
            "time_embed (1, 3, 128)",
        ),
    ],
    ids=["missing", "unknown", "mis-shaped"],
)
def test_key_problems_are_named_in_one_line(tmp_path, capsys, edit, expected):
    path = _timesformer_file(tmp_path, edit)
    args = [
        "convert",
        "--source",
        "slowfast",
        "--input",
        str(path),
        "--output",
        str(tmp_path / "o"),
    ]
    one_line_error(capsys, args, expected, "'model.' prefix")


def test_videomae_missing_bias_named(tmp_path, capsys, videomae):
    state = dict(videomae[1])
    del state["blocks.1.attn.v_bias"]
    path = tmp_path / "ft.pth"
    torch.save({"module": state}, path)
    args = [
        "convert",
        "--source",
        "videomae",
        "--input",
        str(path),
        "--output",
        str(tmp_path / "o"),
    ]
    one_line_error(capsys, args, "missing blocks.1.attn.v_bias")


def test_wrong_source_and_unused_flags(tmp_path, capsys):
    path = _timesformer_file(tmp_path, lambda s: None)
    convert_args = ["convert", "--input", str(path), "--output", str(tmp_path / "o")]
    one_line_error(
        capsys, [*convert_args, "--source", "videomae"], "TimeSformer checkpoint, not VideoMAE"
    )
    # The flag asks for more frames than time_embed holds.
    one_line_error(
        capsys, [*convert_args, "--source", "slowfast", "--num-frames", "8"], "time_embed"
    )
    one_line_error(
        capsys,
        [*convert_args, "--source", "hf", "--num-heads", "4"],
        "--num-heads not used by --source hf",
    )
