"""``vtm-jax eval`` on a loaded config: the dataset it names, the evaluation it describes.

Shared by the command line and ``vtm-jax sweep``. The mapping from a Scenic-style config to an
evaluation is :meth:`vtm_jax.jobs.evaluation.spec.EvalSpec.from_config`; this module adds what a
front end does: the Scenic checkpoint record, checks before any dataset is built, and opening
(or building) the split.
"""

from __future__ import annotations

import json
from typing import Any

from vtm_jax.errors import UserError


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
    import dataclasses

    import jax

    from vtm_jax.jobs.evaluation.evaluate import evaluate, format_results
    from vtm_jax.jobs.evaluation.spec import EvalSpec

    for field in ("checkpoint", "dataset_name"):
        if not config.get(field):
            raise UserError(f"eval needs config.{field}")
    from vtm_jax.data.datasets import reads_in_place

    data = config.get("dataset_configs", {})
    if not data.get("data_dir") and not reads_in_place(config.dataset_name):
        raise UserError("eval needs config.dataset_configs.data_dir")
    from vtm_jax.checkpoints.store import checkpoint_inputs, load_record
    from vtm_jax.config.scenic_checkpoint import checkpoint_record

    scenic_record = checkpoint_record(config)  # a bare Scenic checkpoint: the config describes it
    load_record(config.checkpoint, scenic_record=scenic_record)  # fails before any dataset build
    spec = EvalSpec.from_config(
        config, devices=jax.device_count(), progress=progress, verify=verify
    )
    spec.check_outputs(checkpoint_inputs(config.checkpoint))
    from vtm_jax.jobs.evaluation.evaluate import results_lock
    from vtm_jax.runtime import lock

    # Before the dataset is opened (or built): one run per results path.
    with lock.hold(results_lock(spec.results_path), f"results_path {spec.results_path}"):
        source = _open_source(config, sources)
        spec = dataclasses.replace(spec, dataset=f"{config.dataset_name}/{source.split}")
        results = evaluate(config.checkpoint, source, spec, scenic_record=scenic_record)
    if jax.process_index() == 0 and report:
        print(format_results(results))
        if config.get("results_path"):
            print(f"\nresults written to {config.results_path}")
    return results


def _open_source(config: Any, sources: dict | None) -> Any:
    """The split the config names; with several processes, process 0 builds it first."""
    import jax

    from vtm_jax.data.datasets import open_split

    data = config.get("dataset_configs", {})
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
        return open_split(config.dataset_name, split, build=False, **open_args)
    if sources is None:
        return open_split(config.dataset_name, split, **open_args)
    key = json.dumps([config.dataset_name, split, open_args], sort_keys=True, default=str)
    if key not in sources:
        sources[key] = open_split(config.dataset_name, split, **open_args)
    return sources[key]


EVAL_RESULTS = "eval.json"


def eval_to_files(config: Any, *, workdir: str | None = None, verify: bool = True) -> dict:
    """``vtm-jax eval``: :func:`eval_config` with its files; returns the results.

    With ``workdir``: ``eval.json``, ``eval.md`` (the table) and TensorBoard scalars there;
    otherwise the table goes beside ``config.results_path`` when the config names one. The
    table replaces only one beside eval's own results, unless ``config.eval.overwrite``.
    """
    import jax

    from vtm_jax import paths
    from vtm_jax.jobs.evaluation.metrics import format_results
    from vtm_jax.jobs.evaluation.state import RESULTS_FORMAT
    from vtm_jax.outputs import (
        atomic_file,
        beside_owner,
        check_output_dir,
        check_output_file,
        claim_outputs,
    )

    if workdir:
        if config.get("results_path"):
            raise UserError("give --workdir or --config.results_path, not both")
        check_output_dir(workdir, what="--workdir")
        paths.makedirs(workdir)
        with config.unlocked():
            config.results_path = paths.join(workdir, EVAL_RESULTS)
    path = config.get("results_path")
    table = None
    if path:  # the table beside the JSON, as bench and demo write theirs
        table = (path[: -len(".json")] if path.endswith(".json") else path) + ".md"
        check_output_file(table, what="results_path's table")
        owner = beside_owner(path, RESULTS_FORMAT, "a vtm-jax results file")
        overwrite = bool((config.get("eval") or {}).get("overwrite", False))
        claim_outputs({table: owner}, what="results_path's table", overwrite=overwrite)
    results = eval_config(config, verify=verify)
    lead = jax.process_index() == 0
    if table and lead:
        with atomic_file(table) as f:
            f.write(format_results(results) + "\n")
        print(f"table written to {table}")
    if workdir:
        _log_eval_scalars(config, results, workdir, lead=lead)
    return results


def _log_eval_scalars(config: Any, results: dict, workdir: str, *, lead: bool) -> None:
    """The metrics as TensorBoard scalars in the workdir (clu.metric_writers, as Scenic's
    evaluators), at the step the checkpoint was trained to (0 when it does not say)."""
    from vtm_jax.checkpoints.store import load_record
    from vtm_jax.config.scenic_checkpoint import checkpoint_record
    from vtm_jax.jobs.tensorboard import metric_writer

    record = load_record(config.checkpoint, scenic_record=checkpoint_record(config))
    step = int((record.trained or {}).get("steps", 0))
    scalars = {f"eval/{name}": value for name, value in results["metrics"].items()}
    scalars["eval/clips_per_s"] = results["clips_per_s"]
    writer = metric_writer(workdir, lead=lead)
    writer.write_scalars(step, scalars)
    writer.close()
