"""``vtm-jax eval`` on a loaded config: the dataset it names, the evaluation it describes.

The mapping from a Scenic-style config (``dataset_configs``, ``eval``, ``token_merging``) to
:func:`vtm_jax.evaluate.evaluate`'s arguments, shared by the command line and ``vtm-jax
sweep``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from vtm_jax.errors import UserError
from vtm_jax.outputs import check_output_file


def eval_config(
    config: Any,
    *,
    sources: dict | None = None,
    progress: bool = True,
    report: bool = True,
    verify: bool = True,
) -> dict:
    """``vtm-jax eval`` on a loaded config; returns the results.

    ``sources``: a dict kept by the caller, in which opened dataset splits are cached, so a
    sweep of many runs over the same data opens it once (single-process runs only).
    ``progress``: show the progress bar; ``report``: print the results table; ``verify``:
    check the checkpoint's digests on load.
    """
    import jax

    from vtm_jax.data.datasets import open_split
    from vtm_jax.evaluate import evaluate, format_results
    from vtm_jax.record import PREPROCESSING_KEYS
    from vtm_jax.reduction import ReductionSettings

    data = config.get("dataset_configs", {})
    options = config.get("eval", {})
    for field in ("checkpoint", "dataset_name"):
        if not config.get(field):
            raise UserError(f"eval needs config.{field}")
    from vtm_jax.data.frame_folders import FRAME_DATASETS

    if not data.get("data_dir") and config.dataset_name not in FRAME_DATASETS:
        raise UserError("eval needs config.dataset_configs.data_dir")
    from vtm_jax.checkpoint import load_record
    from vtm_jax.scenic.checkpoint import checkpoint_record

    scenic_record = checkpoint_record(config)  # a bare Scenic checkpoint: the config describes it
    load_record(config.checkpoint, scenic_record=scenic_record)  # fails before any dataset build
    if config.get("results_path"):
        check_output_file(config.results_path, what="results_path")
        if options.get("save_scores"):
            from vtm_jax.evaluate import scores_path_for

            check_output_file(scores_path_for(config.results_path), what="scores file")
    workers = options.get("workers")
    if workers is not None and workers < 1:
        raise UserError(f"eval.workers must be at least 1, not {workers}")
    limit = options.get("limit")
    if limit is not None and limit < 1:
        raise UserError(f"eval.limit must be at least 1 (or unset for all), not {limit}")
    devices = jax.device_count()
    global_batch = data.get("test_batch_size")
    if global_batch is None:
        global_batch = devices
    elif global_batch < 1:
        raise UserError(f"dataset_configs.test_batch_size must be at least 1, not {global_batch}")
    if global_batch % devices:
        raise UserError(
            f"dataset_configs.test_batch_size {global_batch} is not a multiple of the "
            f"{devices} devices"
        )
    split = data.get("split", "test")
    open_args = dict(
        data_dir=data.get("data_dir") or "",
        manual_dir=data.get("manual_dir"),
        config=(data.get("builder_options") or {}) or None,
    )
    if jax.process_count() > 1:  # one process builds; the others read what it wrote
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            open_split(config.dataset_name, split, **open_args)
        multihost_utils.sync_global_devices("vtm-jax eval: dataset built")
        source = open_split(config.dataset_name, split, build=False, **open_args)
    elif sources is not None:
        key = json.dumps([config.dataset_name, split, open_args], sort_keys=True, default=str)
        if key not in sources:
            sources[key] = open_split(config.dataset_name, split, **open_args)
        source = sources[key]
    else:
        source = open_split(config.dataset_name, split, **open_args)
    merging = config.get("token_merging")
    results = evaluate(
        config.checkpoint,
        source,
        merging=None if merging is None else ReductionSettings.from_dict(merging),
        preprocessing=_eval_preprocessing(data, config.dataset_name, split, PREPROCESSING_KEYS),
        batch_size=global_batch // devices,
        num_clips=data.get("num_test_clips", 1),
        three_crops=data.get("do_three_spatial_crops", False),
        results_path=config.get("results_path"),
        attention=options.get("attention", "auto"),
        limit=options.get("limit"),
        overwrite=options.get("overwrite", False),
        dataset=f"{config.dataset_name}/{source.split}",
        softmax_views=config.get("multicrop_softmax_logits", False),
        ensemble=options.get("ensemble", "sum"),
        confusion_matrix=options.get("confusion_matrix", False),
        predictions=options.get("predictions", False),
        save_scores=options.get("save_scores", False),
        workers=options.get("workers"),
        scenic_record=scenic_record,
        position_embeddings=options.get("position_embeddings", "paper"),
        progress=progress,
        verify=verify,
    )
    if jax.process_index() == 0 and report:
        print(format_results(results))
        if config.get("results_path"):
            print(f"\nresults written to {config.results_path}")
    return results


def _eval_preprocessing(data: Any, dataset: str, split: str, keys: Sequence[str]) -> dict:
    """The config's preprocessing entries, with what the protocol needs from the dataset: the
    paper's loader for its name, and whether the split is Scenic's multi-view ``test``."""
    from vtm_jax.data.protocols import paper_loader_for

    prep = {k: data[k] for k in keys if data.get(k) is not None}
    if prep.get("protocol") == "paper":
        prep.setdefault("paper_loader", paper_loader_for(dataset))
    if prep.get("protocol") == "scenic":
        prep.setdefault("is_test_split", split.partition("[")[0] == "test")
    return prep
