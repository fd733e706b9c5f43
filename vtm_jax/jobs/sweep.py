"""Named sweeps: the paper's experiment families (docs/method.md §6) over the checkpoints you have.

:func:`run_sweep` expands the chosen families (:mod:`.sweep_families`) into runs for the
``(model, dataset)`` pairs of a runs file (:mod:`.sweep_plan`), runs each once (a run shared by
several families, such as r=0, runs once), each into its own results file under
``WORKDIR/runs/`` named after its settings and a hash of its whole config, and writes every
family's table in the paper's layout (:mod:`.sweep_tables`: ``<family>.json``, ``<family>.md``
and, for r sweeps, ``<family>.png``). A second call skips finished runs and resumes an
interrupted evaluation where it stopped.

Every run evaluates at the checkpoint's own frame count (family 34 alone changes it), VideoMAE
without proportional attention. Time runs time the checkpoint's architecture with random
weights at the paper's protocol (4 clips per device, 5 warm-up and 100 timed passes; any
``--config.bench.*`` override changes it), and a speedup is the ratio to the r=0 time run of the
same model and dataset. The headline table (``table``) also needs merging at the paper's r for
ViViT on SSv2, which the table reports but family 7 does not run; it is run for the table.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vtm_jax import paths as storage
from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.errors import UserError
from vtm_jax.jobs.sweep_families import CURVE_STEPS, get_families
from vtm_jax.jobs.sweep_methods import format_methods, method_rows, methods_table, plot_methods
from vtm_jax.jobs.sweep_plan import (
    DEMO_RUNS,
    Pair,
    Row,
    Run,
    demo_pairs,
    family_rows,
    read_runs,
)
from vtm_jax.jobs.sweep_tables import (
    family_table,
    format_markdown,
    headline_rows,
    headline_table,
    plot_family,
)
from vtm_jax.runtime.lock import hold

TIME_DEFAULTS = {"bench.batch_size": 4, "bench.warmup": 5, "bench.iterations": 100}
TIME_FORMAT = "vtm-jax-sweep-time"
LOCK_FILE = "vtm-jax.lock"
TABLE_FORMAT = "vtm-jax-sweep-table"  # a family's <family>.json; its .md and .png go beside
# The keys of a table written before tables carried the format: still the sweep's own.
TABLE_LEGACY_KEYS = ("family", "paper", "title", "kind", "columns", "rows")


# ------------------------------------------------------------------------------ run


class Runner:
    """Runs each run once, into its own results file, and reads the results back."""

    def __init__(
        self,
        workdir: str,
        user_overrides: Sequence[str],
        *,
        say: Callable[[str], None] = print,
        progress: bool = True,
    ):
        self.workdir = storage.absolute(workdir)
        self.user_overrides = list(user_overrides)
        self.say = say
        self.progress = progress
        self.sources: dict = {}  # opened dataset splits, shared by the runs on them
        self.params: dict = {}  # random weights per model, shared by its time runs
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.planned: dict[Run, tuple[str, Any]] = {}  # each run's file and config, once

    def load_config(self, pair: Pair, values: Mapping[str, Any] | None = None):
        """The pair's config: its file, the paper's speed protocol, your overrides, the
        pair's, then the run's ``values`` and the pair's paths."""
        from vtm_jax.config.loading import load_config

        paths = {"checkpoint": pair.checkpoint, "dataset_configs.data_dir": pair.data_dir}
        if pair.manual_dir:
            paths["dataset_configs.manual_dir"] = pair.manual_dir
        try:
            return load_config(
                [f"--config={pair.config}", *self.user_overrides, *pair.arguments],
                defaults=TIME_DEFAULTS,
                values={**dict(pair.values), **(values or {}), **paths},
            )
        except UserError as e:
            raise UserError(f"{pair.model}/{pair.dataset}: {e}") from None

    def record(self, pair: Pair) -> ModelRecord:
        """The pair's checkpoint record (a bare Scenic checkpoint: from its Scenic config)."""
        from vtm_jax.checkpoints.store import load_record
        from vtm_jax.config.scenic_checkpoint import checkpoint_record

        config = self.load_config(pair)
        try:
            return load_record(pair.checkpoint, scenic_record=checkpoint_record(config))
        except UserError as e:
            raise UserError(f"runs file: {pair.model}/{pair.dataset}: {e}") from None

    def path(self, run: Run) -> tuple[str, Any]:
        """The run's results file (its settings and a hash of its whole config) and config."""
        if run in self.planned:
            return self.planned[run]
        config = self.load_config(run.pair, run.values())
        # Only what the run reads: new timing settings do not redo the accuracy runs.
        unread = ("bench",) if run.kind == "accuracy" else ("eval", "results_path")
        identity = {k: v for k, v in config.to_dict().items() if k not in unread}
        if isinstance(identity.get("bench"), dict):  # where results go, not what is timed
            identity["bench"] = {k: v for k, v in identity["bench"].items() if k != "overwrite"}
        blob = json.dumps(identity, sort_keys=True, default=str)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
        names = [storage.plain_name(n, "sweep run") for n in (run.pair.model, run.pair.dataset)]
        folder = storage.join(self.workdir, "runs", *names)
        self.planned[run] = storage.join(folder, f"{run.slug()}-{digest}.json"), config
        return self.planned[run]

    def claim(self, runs: Sequence[Run], overwrite: bool) -> None:
        """Before any run: each run's file is absent, a run's own results or ``overwrite``d.

        With ``overwrite``, a run whose file is something else starts afresh over it."""
        from vtm_jax.jobs.evaluation.state import RESULTS_FORMAT
        from vtm_jax.outputs import claim_outputs, results_owner

        for run in runs:
            path, config = self.path(run)
            marker = RESULTS_FORMAT if run.kind == "accuracy" else TIME_FORMAT
            owner = results_owner(marker, f"a sweep {run.kind} run")
            claim_outputs({path: owner}, what="sweep run file", overwrite=overwrite)
            if overwrite and run.kind == "accuracy" and storage.exists(path) and owner(path):
                with config.unlocked():  # eval replaces it instead of refusing it
                    if config.get("eval") is None:
                        config.eval = {}
                    config.eval.overwrite = True

    def execute(self, run: Run, index: int, total: int) -> str:
        """Run ``run`` unless its results file is complete; returns that file."""
        path, config = self.path(run)
        name = f"[{index}/{total}] {run.pair.model} {run.pair.dataset} {run.slug()}"
        if _complete(path):
            self.say(f"{name}: done before, skipped")
            self.skipped.append(path)
            return path
        storage.makedirs(storage.parent(path))
        try:
            self._execute(run, config, path, name)
        except UserError as e:
            raise UserError(f"{run.pair.model}/{run.pair.dataset} {run.slug()}: {e}") from None
        self.ran.append(path)
        return path

    def _execute(self, run: Run, config, path: str, name: str) -> None:
        """Evaluate (eval resumes a half-written file itself) or time ``run`` into ``path``."""
        if run.kind == "accuracy":
            from vtm_jax.jobs.evaluation.from_config import eval_config

            config.results_path = path
            results = eval_config(
                config, sources=self.sources, progress=self.progress, report=False
            )
            shown = ", ".join(f"{k} {100 * v:.2f}" for k, v in results["metrics"].items())
            self.say(f"{name}: {shown}")
        else:
            result = self._time(run, config)
            _write_json(path, {"format": TIME_FORMAT, "complete": True, **result})
            self.say(f"{name}: {result['result']['frames_per_s']:.4g} frames/s")

    def _time(self, run: Run, config) -> dict[str, Any]:
        """Bench's timing of the checkpoint's architecture (random weights, as vtm-jax bench)."""
        from vtm_jax.checkpoints.store import load_record
        from vtm_jax.config.scenic_checkpoint import checkpoint_record
        from vtm_jax.jobs.bench import bench_settings, random_params, run_info
        from vtm_jax.merging import MergingSettings

        record = load_record(run.pair.checkpoint, scenic_record=checkpoint_record(config))
        bench = config.get("bench", {})
        batch = int(bench.get("batch_size", 1))
        attention = bench.get("attention", "auto")
        merging = MergingSettings.from_dict(config.token_merging)
        key = json.dumps([record.to_json(), attention], sort_keys=True, default=str)
        if key not in self.params:  # one initialisation per model, not per timed setting
            self.params[key] = random_params(record, attention)
        (result,) = bench_settings(
            record,
            [merging],
            batch_size=batch,
            warmup=int(bench.get("warmup", 1)),
            iterations=int(bench.get("iterations", 3)),
            attention=attention,
            params=self.params[key],
            progress=lambda _: None,
        )
        return {"config": config.to_dict(), "run": run_info(batch), "result": result}


def _complete(path: str) -> bool:
    """A finished run's file: eval's results or a time run's, marked complete."""
    from vtm_jax.jobs.evaluation.state import RESULTS_FORMAT
    from vtm_jax.outputs import read_json_object

    data = read_json_object(path) if storage.exists(path) else None
    ours = data is not None and data.get("format") in (RESULTS_FORMAT, TIME_FORMAT)
    return bool(ours and data.get("complete"))


def _write_json(path: str, data: Any) -> None:
    from vtm_jax.outputs import write_json

    write_json(path, data, default=str)  # atomic; no temporary file left behind


# ----------------------------------------------------------------------------- main


def run_sweep(
    runs_file: str,
    workdir: str,
    families: Sequence[str],
    *,
    overrides: Sequence[str] = (),
    curve_steps: int = CURVE_STEPS,
    say: Callable[[str], None] = print,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the named families over the runs file's pairs; write their tables into ``workdir``.

    Before any run, every file it will write is checked: a table or run file there that is not
    the sweep's own is refused unless ``overwrite`` (the sweep's own are rewritten, its
    finished runs skipped, its interrupted ones resumed).

    Returns ``{"families": {name: table}, "ran": [...], "skipped": [...]}``.
    """
    if curve_steps < 1:
        raise UserError(f"--curve-steps must be at least 1, not {curve_steps}")
    chosen, want_table = get_families(families)
    pairs = demo_pairs(workdir) if runs_file == DEMO_RUNS else read_runs(runs_file)
    runner = Runner(workdir, overrides, say=say, progress=progress)
    records = {(p.model, p.dataset): runner.record(p) for p in pairs}
    planned: dict[str, list[Row]] = {}
    for family in chosen:
        if family.kind == "methods":
            planned[family.name] = method_rows(pairs, records)
        else:
            planned[family.name] = family_rows(family, pairs, records, curve_steps)
    headline = headline_rows(pairs, records) if want_table else None
    # Every distinct run once, grouped by pair so each dataset is opened once.
    runs: dict[Run, None] = {}
    all_rows = [row for rows in planned.values() for row in rows]
    if headline:
        all_rows += headline[0] + headline[1]
    for row in all_rows:
        for run in row.runs.values():
            runs.setdefault(run)
    order = {(p.model, p.dataset): i for i, p in enumerate(pairs)}
    todo = sorted(runs, key=lambda r: (order[(r.pair.model, r.pair.dataset)], r.kind))
    tables = [(f.name, f.plot) for f in chosen] + ([("table", False)] if headline else [])
    _claim_tables(workdir, tables, overwrite=overwrite, runs_file=runs_file)
    runner.claim(todo, overwrite)
    storage.makedirs(workdir)
    # One sweep per workdir at a time (a second one names the holder and stops).
    with hold(storage.join(workdir, LOCK_FILE), f"--workdir {workdir}"):
        say(
            f"{len(chosen)} famil{'y' if len(chosen) == 1 else 'ies'}, {len(todo)} runs in {workdir}"
        )
        paths = {run: runner.execute(run, i, len(todo)) for i, run in enumerate(todo, 1)}

        written = {}
        for family in chosen:
            if not planned[family.name]:
                say(f"{family.name}: the runs file has no pair this family covers")
            if family.kind == "methods":
                table = methods_table(planned[family.name], paths, runner.workdir)
            else:
                table = family_table(family, planned[family.name], paths, runner.workdir)
            written[family.name] = table
            _write_table(table, storage.join(workdir, family.name), plot=family.plot)
        if headline:
            table = headline_table(headline[0], headline[1], paths, runner.workdir)
            written["table"] = table
            _write_table(table, storage.join(workdir, "table"), plot=False)
            say("\n" + format_markdown(table))
        say(
            f"wrote {len(written)} table(s) to {workdir}: {', '.join(written)} "
            f"({len(runner.ran)} runs run, {len(runner.skipped)} done before)"
        )
        return {"families": written, "ran": runner.ran, "skipped": runner.skipped}


def _claim_tables(
    workdir: str, tables: Sequence[tuple[str, bool]], *, overwrite: bool, runs_file: str
) -> None:
    """Each table's ``.json``, ``.md`` (and ``.png``) replace only an earlier sweep's."""
    from vtm_jax.outputs import check_output_file, claim_outputs, results_targets

    for name, plot in tables:
        stem = storage.join(workdir, name)
        derived = [stem + ".md"] + ([stem + ".png"] if plot else [])
        for path in [stem + ".json", *derived]:
            if storage.exists(workdir):  # a new workdir is checked as a whole
                check_output_file(path, what="sweep table")
        targets = results_targets(
            stem + ".json", derived, TABLE_FORMAT, "a sweep table", legacy=TABLE_LEGACY_KEYS
        )
        inputs = {"the --runs file": runs_file}
        claim_outputs(targets, what="sweep table", overwrite=overwrite, inputs=inputs)


def _write_table(table: dict[str, Any], stem: str, *, plot: bool) -> None:
    from vtm_jax.outputs import atomic_file

    methods = table["kind"] == "methods"
    _write_json(stem + ".json", {"format": TABLE_FORMAT, **table})
    with atomic_file(stem + ".md") as f:
        f.write(format_methods(table) if methods else format_markdown(table))
    if plot:
        (plot_methods if methods else plot_family)(table, stem + ".png")
