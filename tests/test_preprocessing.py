"""The one preprocessing type: checked once, filled from a record, and its JSON form."""

import ast
import dataclasses
import pathlib

import numpy as np
import pytest

import vtm_jax
from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.data.preprocessing import PREPROCESSING_FIELDS, Preprocessing
from vtm_jax.data.protocols import ViewSpec
from vtm_jax.errors import UserError

PACKAGE = pathlib.Path(vtm_jax.__file__).parent
ENTRIES = {
    "num_frames": 4,
    "stride": 2,
    "min_resize": 20,
    "crop_size": 16,
    "mean": [0.45, 0.45, 0.45],
    "std": [0.225, 0.225, 0.225],
}


def _record(preprocessing=None):
    return ModelRecord("vivit", {"num_classes": 5}, 8, 32, preprocessing=preprocessing)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stride": 0}, "preprocessing stride must be a positive integer, not 0"),
        ({"num_frames": 2.0}, "preprocessing num_frames must be a positive integer, not 2.0"),
        ({"mean": (0.5, 0.5)}, "preprocessing mean must be 3 finite numbers"),
        ({"std": [1, 1, 0]}, r"preprocessing std must be 3 finite numbers \(std > 0\)"),
        ({"protocol": "dmvr"}, "unknown protocol 'dmvr'; valid: paper, scenic, centred"),
        ({"paper_loader": "ucf"}, "unknown paper_loader 'ucf'; valid: kinetics, ssv2"),
        ({"sampling": "middle"}, "unknown sampling 'middle'; valid: stride, segments"),
    ],
)
def test_every_entry_is_checked_when_built(change, message):
    with pytest.raises(UserError, match=f"^{message}") as caught:
        Preprocessing.from_dict({**ENTRIES, **change})
    assert "\n" not in str(caught.value)
    # Built directly, or from a record's entries, it is the same check with the same message.
    with pytest.raises(UserError, match=f"^{message}"):
        Preprocessing(**{**ENTRIES, **change})
    with pytest.raises(UserError, match=f"^{message}"):
        _record(ENTRIES).resolve_preprocessing(change)


def test_fields_are_typed_and_defaulted():
    prep = Preprocessing.from_dict({**ENTRIES, "mean": np.full(3, 0.5)})
    assert prep.mean == (0.5, 0.5, 0.5) and isinstance(prep.mean[0], float)
    assert (prep.sampling, prep.protocol) == ("stride", "centred")
    assert prep.paper_loader is None and prep.is_test_split is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        prep.stride = 3
    with pytest.raises(UserError, match="^preprocessing lacks stride, mean$"):
        Preprocessing.from_dict({k: v for k, v in ENTRIES.items() if k not in ("stride", "mean")})


def test_defaults_come_from_the_record():
    prep = _record({k: ENTRIES[k] for k in ("stride", "min_resize", "mean", "std")})
    resolved = prep.resolve_preprocessing()
    assert isinstance(resolved, Preprocessing)
    # The frame count and crop are the input size's; sampling and protocol the defaults.
    assert (resolved.num_frames, resolved.crop_size) == (8, 32)
    assert (resolved.sampling, resolved.protocol) == ("stride", "centred")
    with pytest.raises(UserError, match="^the checkpoint records no preprocessing mean, std;"):
        _record({"stride": 1, "min_resize": 16}).resolve_preprocessing()


def test_an_override_replaces_the_stored_entry():
    record = _record({**ENTRIES, "protocol": "scenic", "is_test_split": False})
    prep = record.resolve_preprocessing({"stride": 5, "min_resize": None, "crop_size": 8})
    assert (prep.stride, prep.min_resize, prep.crop_size) == (5, 20, 8)  # None: the stored one
    assert prep.is_test_split is False
    assert record.resolve_preprocessing({"protocol": "paper"}).to_dict()["protocol"] == "paper"


def test_unknown_entries():
    valid = ", ".join(PREPROCESSING_FIELDS)
    with pytest.raises(
        UserError, match=f"^unknown preprocessing entries crop, size; valid: {valid}$"
    ):
        Preprocessing.from_dict({**ENTRIES, "size": 3, "crop": 2})
    with pytest.raises(UserError, match="^unknown preprocessing entries size;"):
        _record(ENTRIES).resolve_preprocessing({"size": None})


def test_to_dict_round_trips_and_drops_other_protocols_entries():
    paper = {**ENTRIES, "protocol": "paper", "paper_loader": "ssv2", "is_test_split": True}
    prep = Preprocessing.from_dict(paper)
    plain = prep.to_dict()
    assert plain == {**ENTRIES, "sampling": "stride", "protocol": "paper", "paper_loader": "ssv2"}
    assert list(plain) == [k for k in PREPROCESSING_FIELDS if k in plain]
    assert Preprocessing.from_dict(plain) == dataclasses.replace(prep, is_test_split=None)
    for values in (ENTRIES, {**ENTRIES, "protocol": "scenic", "is_test_split": False}):
        again = Preprocessing.from_dict(values)
        assert Preprocessing.from_dict(again.to_dict()) == again
    scenic = Preprocessing.from_dict({**ENTRIES, "protocol": "scenic", "is_test_split": False})
    assert "paper_loader" not in scenic.to_dict() and scenic.to_dict()["is_test_split"] is False


def test_view_spec_is_the_preprocessing_and_the_views():
    prep = Preprocessing.from_dict({**ENTRIES, "protocol": "paper"})
    spec = ViewSpec.from_preprocessing(prep, num_clips=4, three_crops=True)
    assert all(getattr(spec, name) == getattr(prep, name) for name in ENTRIES)
    assert (spec.paper_loader, spec.is_test_split, spec.num_clips) == ("kinetics", True, 4)
    with pytest.raises(UserError, match="^num_clips must be positive, got 0"):
        ViewSpec.from_preprocessing(prep, num_clips=0)


def _key_lists(tree: ast.AST) -> list[int]:
    """Lines of tuple, list and set literals naming ``min_resize`` and ``crop_size``: a list
    of the entries (``("mean", "std")`` alone is a pair of them, not a list)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            names = {e.value for e in node.elts if isinstance(e, ast.Constant)}
            if {"min_resize", "crop_size"} <= names:
                found.append(node.lineno)
    return found


def test_no_other_list_of_the_entries():
    """The entries are listed once, as Preprocessing's fields; other modules derive from it."""
    assert _key_lists(ast.parse('K = ("x", "crop_size", "min_resize")\nM = ["mean", "std"]')) == [1]
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).as_posix() == "data/preprocessing.py":
            continue
        for line in _key_lists(ast.parse(path.read_text(encoding="utf-8"))):
            found.append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    assert not found, "derive these from vtm_jax.data.preprocessing:\n" + "\n".join(found)
