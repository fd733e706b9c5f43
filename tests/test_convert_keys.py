"""Key mapping and shapes of the HF and Scenic ViViT converters (no JAX model involved)."""

import json
import re
import shutil

import numpy as np
import pytest

from vtm_jax.checkpoints.convert.checkpoint_files import read_state_dict
from vtm_jax.checkpoints.convert.common import flatten
from vtm_jax.checkpoints.convert.hf_vivit import convert_vivit, load_hf_vivit
from vtm_jax.checkpoints.convert.scenic import read_scenic_checkpoint, vivit_config_from_params
from vtm_jax.errors import UserError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

D, H, M, L, C = 64, 4, 128, 2, 10
HF_CONFIG = dict(
    image_size=32,
    num_frames=4,
    tubelet_size=[2, 8, 8],
    hidden_size=D,
    num_hidden_layers=L,
    num_attention_heads=H,
    intermediate_size=M,
    num_labels=C,
)
N = (4 // 2) * (32 // 8) * (32 // 8) + 1
Q0 = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query"


def expected_shapes(d, h, m, layers, tubelet, n, classes, cls=True, rep=None):
    """The Scenic spatio-temporal ViViT tree, written out independently of the package."""
    t, ph, pw = tubelet
    shapes = {"cls": (1, 1, d)} if cls else {}
    shapes |= {
        "embedding/kernel": (t, ph, pw, 3, d),
        "embedding/bias": (d,),
        "Transformer/posembed_input/pos_embedding": (1, n, d),
        "Transformer/encoder_norm/scale": (d,),
        "Transformer/encoder_norm/bias": (d,),
        "output_projection/kernel": (rep or d, classes),
        "output_projection/bias": (classes,),
    }
    if rep:
        shapes |= {"pre_logits/kernel": (d, rep), "pre_logits/bias": (rep,)}
    for i in range(layers):
        b = f"Transformer/encoderblock_{i}"
        a = f"{b}/MultiHeadDotProductAttention_0"
        for ln in ("LayerNorm_0", "LayerNorm_1"):
            shapes |= {f"{b}/{ln}/scale": (d,), f"{b}/{ln}/bias": (d,)}
        for p in ("query", "key", "value"):
            shapes |= {f"{a}/{p}/kernel": (d, h, d // h), f"{a}/{p}/bias": (h, d // h)}
        shapes |= {f"{a}/out/kernel": (h, d // h, d), f"{a}/out/bias": (d,)}
        shapes |= {f"{b}/MlpBlock_0/Dense_0/kernel": (d, m), f"{b}/MlpBlock_0/Dense_0/bias": (m,)}
        shapes |= {f"{b}/MlpBlock_0/Dense_1/kernel": (m, d), f"{b}/MlpBlock_0/Dense_1/bias": (d,)}
    return shapes


def tree_shapes(params):
    return {k: tuple(v.shape) for k, v in flatten(params).items()}


def assert_trees_equal(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = transformers.VivitConfig(**HF_CONFIG)
    return transformers.VivitForVideoClassification(config).eval()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_vivit")
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_config(hf_dir):
    return json.loads((hf_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def loaded(hf_dir):
    return load_hf_vivit(hf_dir)


def test_load_hf_vivit_gives_the_scenic_tree(loaded):
    assert set(loaded) == {"params", "model", "input", "labels", "preprocessing"}
    assert tree_shapes(loaded["params"]) == expected_shapes(D, H, M, L, (2, 8, 8), N, C)
    for leaf in flatten(loaded["params"]).values():
        assert isinstance(leaf, np.ndarray) and leaf.dtype == np.float32
    assert loaded["model"] == {
        "num_classes": C,
        "hidden_size": D,
        "num_heads": H,
        "mlp_dim": M,
        "num_layers": L,
        "patch_size": (2, 8, 8),
        "classifier": "token",
        "representation_size": None,
        "layer_norm_eps": 1e-6,
        "gelu_approximate": True,
    }
    assert loaded["input"] == {"num_frames": 4, "image_size": 32}
    assert loaded["labels"] == [f"LABEL_{i}" for i in range(C)]
    assert loaded["preprocessing"] == {
        "num_frames": 4,
        "stride": 2,
        "min_resize": 37,  # round(32 * 256 / 224)
        "crop_size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }


def test_on_disk_names_are_the_old_ones(hf_dir):
    keys = read_state_dict(hf_dir)
    assert "vivit.encoder.layer.0.attention.attention.query.weight" in keys
    assert not any(k.startswith("vivit.layers.") for k in keys)


def test_in_memory_names_give_the_same_tree(hf_model, hf_config, loaded):
    state = hf_model.state_dict()
    assert "vivit.layers.0.attention.q_proj.weight" in state
    params, model_config, input_config = convert_vivit(state, hf_config)
    assert_trees_equal(params, loaded["params"])
    assert model_config == loaded["model"]
    assert input_config == loaded["input"]


def test_bin_only_directory(hf_dir, loaded, tmp_path):
    from safetensors.torch import load_file

    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    torch.save(load_file(hf_dir / "model.safetensors"), tmp_path / "pytorch_model.bin")
    assert_trees_equal(load_hf_vivit(tmp_path)["params"], loaded["params"])


def test_sharded_safetensors(hf_model, loaded, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_trees_equal(load_hf_vivit(tmp_path)["params"], loaded["params"])


def test_missing_key_is_named(hf_dir, hf_config):
    state = read_state_dict(hf_dir)
    del state["vivit.encoder.layer.1.output.dense.bias"]
    with pytest.raises(UserError, match=r"missing vivit\.encoder\.layer\.1\.output\.dense\.bias"):
        convert_vivit(state, hf_config)


def test_extra_key_is_named(hf_dir, hf_config):
    state = read_state_dict(hf_dir)
    state["vivit.pooler.dense.weight"] = np.zeros((D, D), np.float32)
    with pytest.raises(UserError, match=r"unknown vivit\.pooler\.dense\.weight"):
        convert_vivit(state, hf_config)


def test_mis_shaped_key_is_named(hf_dir, hf_config):
    state = read_state_dict(hf_dir)
    state["vivit.encoder.layer.0.intermediate.dense.weight"] = np.zeros((M, D + 1), np.float32)
    with pytest.raises(UserError, match=r"vivit\.encoder\.layer\.0\.intermediate\.dense\.weight"):
        convert_vivit(state, hf_config)


def test_many_missing_keys_are_counted(hf_dir, hf_config):
    state = {k: v for k, v in read_state_dict(hf_dir).items() if ".layer.1." not in k}
    with pytest.raises(UserError, match=r"and 11 more \(16 in all\)"):
        convert_vivit(state, hf_config)


def test_mixed_namings_are_rejected(hf_model, hf_dir, hf_config):
    state = read_state_dict(hf_dir)
    state["vivit.layers.0.mlp.fc1.bias"] = hf_model.state_dict()["vivit.layers.0.mlp.fc1.bias"]
    with pytest.raises(UserError, match="mixed key namings"):
        convert_vivit(state, hf_config)


def test_base_model_has_no_classifier_head(hf_config, tmp_path):
    base = transformers.VivitModel(transformers.VivitConfig(**HF_CONFIG))
    base.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="no classifier head"):
        load_hf_vivit(tmp_path)
    prefixed = {f"vivit.{k}": v for k, v in base.state_dict().items() if "pooler" not in k}
    with pytest.raises(UserError, match="no classifier head"):
        convert_vivit(prefixed, hf_config)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_act": "relu"}, "hidden_act='relu'"),
        ({"qkv_bias": False}, "qkv_bias"),
        ({"num_channels": 1}, "num_channels=1"),
        ({"model_type": "videomae"}, "model_type='videomae'"),
    ],
)
def test_unsupported_config_is_rejected(hf_dir, hf_config, change, message):
    with pytest.raises(UserError, match=re.escape(message)):
        convert_vivit(read_state_dict(hf_dir), {**hf_config, **change})


def test_exact_gelu_is_not_approximate(hf_dir, hf_config):
    _, model_config, _ = convert_vivit(read_state_dict(hf_dir), {**hf_config, "hidden_act": "gelu"})
    assert model_config["gelu_approximate"] is False


def test_missing_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_state_dict(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no weights"):
        read_state_dict(tmp_path)
    with pytest.raises(UserError, match="no config.json"):
        load_hf_vivit(tmp_path)


def test_values_match_the_hf_layers(hf_model, loaded):
    """q kernel is the transposed weight split into heads; the maps compute the same thing."""
    params = flatten(loaded["params"])
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    w_q = state["vivit.layers.0.attention.q_proj.weight"]
    b_q = state["vivit.layers.0.attention.q_proj.bias"]
    np.testing.assert_array_equal(params[f"{Q0}/kernel"], w_q.T.reshape(D, H, D // H))
    np.testing.assert_array_equal(params[f"{Q0}/bias"], b_q.reshape(H, D // H))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, D)).astype(np.float32)
    q_hf = (x @ w_q.T + b_q).reshape(5, H, D // H)  # how HF splits heads
    q = np.einsum("nd,dhk->nhk", x, params[f"{Q0}/kernel"]) + params[f"{Q0}/bias"]
    np.testing.assert_allclose(q, q_hf, rtol=1e-5, atol=1e-5)

    a = "vivit.layers.1.attention.o_proj"
    heads = rng.standard_normal((5, H, D // H)).astype(np.float32)
    out_hf = heads.reshape(5, D) @ state[f"{a}.weight"].T + state[f"{a}.bias"]
    o = "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/out"
    out = np.einsum("nhk,hkd->nd", heads, params[f"{o}/kernel"]) + params[f"{o}/bias"]
    np.testing.assert_allclose(out, out_hf, rtol=1e-5, atol=1e-5)

    logits_in = rng.standard_normal((5, D)).astype(np.float32)
    logits_hf = logits_in @ state["classifier.weight"].T + state["classifier.bias"]
    logits = logits_in @ params["output_projection/kernel"] + params["output_projection/bias"]
    np.testing.assert_allclose(logits, logits_hf, rtol=1e-5, atol=1e-5)


def test_tubelet_embedding_matches_conv3d(hf_model, loaded):
    params = flatten(loaded["params"])
    video = torch.randn(1, 3, 4, 32, 32)  # (B, C, T, H, W), what HF's Conv3d sees
    with torch.no_grad():
        ref = hf_model.vivit.embeddings.patch_embeddings.projection(video)  # (1, D, 2, 4, 4)
    v = video.numpy()[0].transpose(1, 2, 3, 0)  # (T, H, W, C)
    patches = v.reshape(2, 2, 4, 8, 4, 8, 3).transpose(0, 2, 4, 1, 3, 5, 6)
    out = np.einsum("abcthwi,thwid->abcd", patches, params["embedding/kernel"])
    out += params["embedding/bias"]
    np.testing.assert_allclose(out, ref.numpy()[0].transpose(1, 2, 3, 0), rtol=1e-4, atol=1e-4)


def test_preprocessor_config_is_read_as_transformers_applies_it(hf_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_dir / name, tmp_path / name)
    prep_path = tmp_path / "preprocessor_config.json"

    prep_path.write_text(
        json.dumps(
            {
                "do_normalize": False,
                "size": {"shortest_edge": 40},
                "crop_size": {"height": 32, "width": 32},
            }
        )
    )
    prep = load_hf_vivit(tmp_path)["preprocessing"]
    assert prep["min_resize"] == 40 and prep["crop_size"] == 32
    np.testing.assert_allclose(prep["mean"], [0.5] * 3)  # p / 127.5 - 1: [-1, 1]
    np.testing.assert_allclose(prep["std"], [0.5] * 3)

    # VivitImageProcessor's own defaults: rescale and offset, then normalise again.
    prep_path.write_text(json.dumps({"crop_size": {"height": 32, "width": 32}}))
    prep = load_hf_vivit(tmp_path)["preprocessing"]
    pixels = np.array([0.0, 100.0, 255.0])
    hf = (pixels / 127.5 - 1 - 0.5) / 0.5
    ours = (pixels / 255 - prep["mean"][0]) / prep["std"][0]
    np.testing.assert_allclose(ours, hf, atol=1e-9)

    prep_path.write_text(json.dumps({"crop_size": {"height": 224, "width": 224}}))
    with pytest.raises(UserError, match="crop_size 224"):
        load_hf_vivit(tmp_path)


# ---------------------------------------------------------------------------------------------
# Scenic msgpack checkpoints


def scenic_params(seed=0, cls=True, rep=None, frames=4, size=8):
    rng = np.random.default_rng(seed)
    n = (frames // 2) * (size // 4) ** 2 + int(cls)
    shapes = expected_shapes(8, 2, 16, 2, (2, 4, 4), n, 5, cls=cls, rep=rep)
    flat = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    tree = {}
    for path, value in flat.items():
        *parents, name = path.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value
    return tree


def write_msgpack(path, state):
    from flax.serialization import msgpack_serialize

    path.write_bytes(msgpack_serialize(state))


def test_scenic_flax_optim_layout_file(tmp_path):
    params = scenic_params()
    state = {"optimizer": {"target": params, "state": {"step": np.int32(3)}}}
    write_msgpack(tmp_path / "checkpoint", state)
    assert_trees_equal(read_scenic_checkpoint(tmp_path / "checkpoint"), params)


def test_scenic_inner_params_and_optax_layout_directory(tmp_path):
    params = scenic_params()
    write_msgpack(tmp_path / "checkpoint_2", {"params": scenic_params(seed=1)})
    write_msgpack(tmp_path / "checkpoint_5", {"params": params, "opt_state": {}})
    assert_trees_equal(read_scenic_checkpoint(tmp_path), params)

    inner = tmp_path / "inner"
    inner.mkdir()
    write_msgpack(inner / "checkpoint_5", {"optimizer": {"target": {"params": params}}})
    assert_trees_equal(read_scenic_checkpoint(inner), params)


def test_scenic_unknown_layout_names_top_level_keys(tmp_path):
    write_msgpack(tmp_path / "checkpoint_1", {"weights": scenic_params(), "step": 1})
    with pytest.raises(UserError, match="top-level keys: step, weights"):
        read_scenic_checkpoint(tmp_path)
    with pytest.raises(UserError, match="not found"):
        read_scenic_checkpoint(tmp_path / "nothing")
    (tmp_path / "garbage").write_bytes(b"\x00\x01 not msgpack")
    with pytest.raises(UserError):
        read_scenic_checkpoint(tmp_path / "garbage")


def test_vivit_config_from_params():
    model_config, input_config = vivit_config_from_params(
        scenic_params(), num_frames=4, image_size=8
    )
    assert model_config == {
        "num_classes": 5,
        "hidden_size": 8,
        "num_heads": 2,
        "mlp_dim": 16,
        "num_layers": 2,
        "patch_size": (2, 4, 4),
        "classifier": "token",
        "representation_size": None,
        "layer_norm_eps": 1e-6,
        "gelu_approximate": True,
    }
    assert input_config == {"num_frames": 4, "image_size": 8}

    gap, _ = vivit_config_from_params(scenic_params(cls=False, rep=12), num_frames=4, image_size=8)
    assert gap["classifier"] == "gap" and gap["representation_size"] == 12


def test_vivit_config_agrees_with_hf_conversion(loaded):
    model_config, _ = vivit_config_from_params(loaded["params"], num_frames=4, image_size=32)
    assert model_config == loaded["model"]


def test_wrong_pos_embedding_length_asks_for_input_size():
    with pytest.raises(UserError, match="--num-frames") as info:
        vivit_config_from_params(scenic_params(), num_frames=8, image_size=8)
    assert "9 tokens" in str(info.value) and "--num-frames=4 --image-size=8" in str(info.value)
    with pytest.raises(UserError, match="--num-frames"):
        vivit_config_from_params(scenic_params(), num_frames=5, image_size=8)


def test_scenic_tree_must_be_exactly_spacetime_vivit():
    params = scenic_params()
    params["Transformer"]["encoderblock_0"]["LayerNorm_space"] = {"scale": np.ones(8)}
    with pytest.raises(UserError, match="encoderblock_0/LayerNorm_space/scale"):
        vivit_config_from_params(params, num_frames=4, image_size=8)

    params = scenic_params()
    del params["Transformer"]["encoderblock_1"]["MlpBlock_0"]["Dense_1"]["bias"]
    with pytest.raises(UserError, match="missing Transformer/encoderblock_1/MlpBlock_0/Dense_1"):
        vivit_config_from_params(params, num_frames=4, image_size=8)

    params = scenic_params()
    params["SpatialTransformer"] = params.pop("Transformer")
    with pytest.raises(UserError, match="SpatialTransformer"):
        vivit_config_from_params(params, num_frames=4, image_size=8)

    params = scenic_params()
    params["Transformer"]["encoder_norm"]["scale"] = np.ones(9, np.float32)
    with pytest.raises(UserError, match=r"encoder_norm/scale \(9,\)"):
        vivit_config_from_params(params, num_frames=4, image_size=8)


def test_params_do_not_alias_the_torch_model(hf_model, hf_config):
    state = hf_model.state_dict()
    params, _, _ = convert_vivit(state, hf_config)
    before = params["embedding"]["bias"].copy()
    with torch.no_grad():
        state["vivit.embeddings.patch_embeddings.projection.bias"].add_(1.0)
    try:
        np.testing.assert_array_equal(params["embedding"]["bias"], before)
    finally:
        with torch.no_grad():
            state["vivit.embeddings.patch_embeddings.projection.bias"].sub_(1.0)
