"""Asking settings that merge nothing (mode none) to merge is never a silent no-op.

One rule (``vtm_jax.merging.settings.changed``) in the API, the command line and configs:
r above 0, a schedule or layer duplication given without a mode switches mode ``none`` to
``merge`` and says so; a rule option given that way is an error naming its modes; naming
``mode="none"`` keeps it.
"""

from __future__ import annotations

import numpy as np
import pytest

import vtm_jax
from vtm_jax.cli import main
from vtm_jax.config.loading import load_config
from vtm_jax.merging import MergingSettings
from vtm_jax.merging.settings import asks_for_merging, changed


def test_the_rule_on_settings():
    assert changed(MergingSettings(), {"r": 8}).mode == "merge"
    assert changed(MergingSettings(), {"schedule": -1.0, "r": 4}).mode == "merge"
    assert changed(MergingSettings(), {"duplicate": (0, 2), "r": 4}).mode == "merge"
    assert changed(MergingSettings(), {"r": 0}).mode == "none"  # r=0 asks for nothing
    assert changed(MergingSettings(), {"r": 8, "mode": "none"}).mode == "none"  # named
    assert changed(MergingSettings(), {"seed": 3}).mode == "none"  # read by random modes only
    assert changed(MergingSettings(mode="drop", r=2), {"r": 8}).mode == "drop"
    assert asks_for_merging({"r": [0, 4]}) and not asks_for_merging({"r": [0, 0]})
    assert asks_for_merging({"r": (8, -1.0)}) and not asks_for_merging({"r": (0, 1.0)})
    with pytest.raises(vtm_jax.UserError, match="threshold is an option of mode hybrid"):
        changed(MergingSettings(), {"threshold": 0.4})
    hybrid = changed(MergingSettings(), {"mode": "hybrid", "r": 8, "threshold": 0.5})
    assert hybrid.rule_options == {"threshold": 0.5}


def test_the_api_merges_when_asked():
    model, _, record = vtm_jax.load(vtm_jax.demo_checkpoint(), verify=False)
    off = vtm_jax.with_merging(model, mode="none")
    assert off.merging.mode == "none"
    baseline = vtm_jax.token_counts(off, record)
    assert len(set(baseline)) == 1  # nothing merges
    on = vtm_jax.with_merging(off, r=8)
    assert on.merging.mode == "merge" and on.merging.r == 8  # the returned settings say so
    counts = vtm_jax.token_counts(on, record)
    assert counts[0] == baseline[0] - 8 and counts == sorted(counts, reverse=True)
    assert vtm_jax.settings(r=64).mode == "merge"
    assert vtm_jax.settings({"r": 64}).mode == "merge"  # a dict without a mode: changes
    assert vtm_jax.settings({"mode": "none", "r": 64}).mode == "none"
    with pytest.raises(vtm_jax.UserError, match="give the mode too"):
        vtm_jax.with_merging(off, threshold=0.5)


def test_the_command_line_prints_what_runs(tmp_path, capsys):
    clip = tmp_path / "clip.npy"
    np.save(clip, np.zeros((16, 32, 32, 3), np.float32))
    checkpoint = vtm_jax.demo_checkpoint()
    args = ["predict", "--checkpoint", checkpoint, "--video", str(clip), "--no-verify"]
    assert main([*args, "--mode", "none"]) == 0
    assert "mode=none" in capsys.readouterr().out
    assert main([*args, "--mode", "none", "--r", "4"]) == 0  # named: kept
    assert "mode=none r=0 " in capsys.readouterr().out  # what runs: mode none removes nothing


def test_a_config_override_asks_a_none_block_to_merge(tmp_path, capsys):
    with open(vtm_jax.shipped_configs()["vivit_tiny"], encoding="utf-8") as f:
        text = f.read()
    assert 'token_merging_config(mode="merge", r=8)' in text
    config_file = tmp_path / "none_block.py"
    config_file.write_text(text.replace('mode="merge", r=8', 'mode="none", r=0'))
    plain = load_config([f"--config={config_file}"])
    assert plain.token_merging.mode == "none"
    asked = load_config([f"--config={config_file}", "--config.token_merging.r=4"])
    assert asked.token_merging.mode == "merge" and asked.token_merging.r == 4
    assert "token_merging.mode was none" in capsys.readouterr().err
    named = ["--config.token_merging.mode=none", "--config.token_merging.r=4"]
    assert load_config([f"--config={config_file}", *named]).token_merging.mode == "none"
    by_value = load_config(str(config_file), values={"token_merging.r": 2})
    assert by_value.token_merging.mode == "merge"
    with pytest.raises(vtm_jax.UserError, match="threshold is an option of mode hybrid"):
        load_config([f"--config={config_file}", "--config.token_merging.threshold=0.4"])
