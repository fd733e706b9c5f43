"""What an evaluation run is, besides the checkpoint and the data: :class:`EvalSpec`.

``EvalSpec.from_config`` maps a Scenic-style config (``dataset_configs``, ``eval``,
``token_merging``, ``multicrop_softmax_logits``, ``results_path``) to a spec; ``vtm-jax eval``
and ``vtm-jax sweep`` build their runs through it (``vtm_jax.jobs.evaluation.from_config``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from vtm_jax.errors import UserError
from vtm_jax.jobs.evaluation.input import check_worker_kind
from vtm_jax.merging import MergingSettings
from vtm_jax.outputs import check_output_file, claim_outputs, results_targets

ENSEMBLES = ("sum", "max")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """How to evaluate: views, batching, merging, outputs, and what the results keep.

    Attributes:
      merging: merging settings; ``None`` uses the checkpoint's stored ``token_merging``.
      preprocessing: entries that override the checkpoint's preprocessing record.
      batch_size: videos per device per step (each with all its views).
      num_clips, three_crops: views per video (temporal clips x 1 or 3 spatial crops).
      results_path: JSON results, rewritten after every batch; an existing file of the same run
        is resumed, and a file of a different run, or any other file, is an error unless
        ``overwrite`` (which starts afresh over it).
      attention: attention backend (``vtm_jax.models.attention.get_attention``).
      dtype: what the model computes in, ``float32`` (the default) or ``bfloat16``
        (``vtm_jax.models.layers.DTYPES``): activations and matmuls; parameters, softmax,
        merge arithmetic and logits stay float32. The results' ``info`` records it.
      progress: show a progress bar (process 0 only).
      limit: evaluate only the first ``limit`` examples of the source.
      dataset: a name for the data in the results, e.g. ``'kinetics400/validation'``. The
        default is taken from the source's ``name`` and ``split``.
      softmax_views: average each head's softmax probabilities over views, not its logits.
      ensemble: how views combine: ``sum`` (SlowFast's default, Scenic's mean) or ``max``
        (SlowFast's ``ENSEMBLE_METHOD max``); see ``evaluation.metrics.view_metrics``.
      confusion_matrix, predictions: also keep a confusion matrix per head (rows: true class),
        and per video its label(s) and top-5 classes.
      save_scores: also write each video's combined scores, labels and id to
        ``<results stem>.scores.npz``; needs ``results_path``.
      workers: grain threads that read and decode videos ahead of the devices (default: the
        CPU count, at most 8).
      worker_kind: ``threads`` (in this process) or ``processes`` (grain's worker processes:
        Python's decoding and cropping no longer share one interpreter; the source must pickle).
      verify: check the checkpoint's digests on load. The results name the parameters by
        their content digest either way, and a resume against other parameters is refused.
      position_embeddings: when ``preprocessing`` asks for another frame count than the
        checkpoint's, what becomes of the learned temporal positions that no longer fit:
        ``paper`` (zeros, as the paper's loader) or ``interpolate`` (``vtm_jax.checkpoints.frame_count``).
      clips_per_step: run a device's ``batch_size x views`` clips this many at a time
        (:func:`vtm_jax.models.base.apply_in_steps`): faster on a CPU at large batches, the
        same logits for deterministic modes; None runs them all at once.
    """

    merging: MergingSettings | None = None
    preprocessing: Mapping[str, Any] | None = None
    batch_size: int = 1
    num_clips: int = 1
    three_crops: bool = False
    results_path: str | None = None
    attention: str = "auto"
    dtype: str = "float32"
    progress: bool = True
    limit: int | None = None
    overwrite: bool = False
    dataset: str | None = None
    softmax_views: bool = False
    ensemble: str = "sum"
    confusion_matrix: bool = False
    predictions: bool = False
    save_scores: bool = False
    workers: int | None = None
    worker_kind: str = "threads"
    verify: bool = True
    position_embeddings: str = "paper"
    clips_per_step: int | None = None

    def __post_init__(self) -> None:
        from vtm_jax.models.layers import dtype_name

        object.__setattr__(self, "dtype", dtype_name(self.dtype))  # a name, as results keep it
        for name, value in (("batch_size", self.batch_size), ("num_clips", self.num_clips)):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be an integer >= 1, not {value!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise UserError(f"limit must be a positive integer (or unset), not {self.limit!r}")
        check_worker_kind(self.worker_kind)
        if self.ensemble not in ENSEMBLES:
            raise UserError(f"unknown ensemble {self.ensemble!r}; valid: {', '.join(ENSEMBLES)}")
        step = self.clips_per_step
        clips = self.batch_size * self.views
        if step is not None and (not isinstance(step, int) or step < 1 or clips % step):
            raise UserError(
                f"clips_per_step must divide the {clips} clips of a device batch "
                f"(batch_size x views), not {step!r}"
            )
        if self.save_scores and self.results_path is None:
            raise UserError("save_scores needs a results_path (the scores go beside it)")

    @property
    def views(self) -> int:
        """Views per video: temporal clips x spatial crops."""
        return self.num_clips * (3 if self.three_crops else 1)

    def check_outputs(self, inputs: Mapping[str, str | None] | None = None) -> None:
        """The results file (and scores file) can be written, and replace nothing but results
        of eval (``vtm_jax.outputs.claim_outputs``) nor any of ``inputs`` (named paths the run
        reads): checked before any work."""
        from vtm_jax.jobs.evaluation.results import scores_path_for
        from vtm_jax.jobs.evaluation.state import RESULTS_FORMAT

        if self.results_path is None:
            return
        check_output_file(self.results_path, what="results_path")
        derived = []
        if self.save_scores:
            scores = scores_path_for(self.results_path)
            check_output_file(scores, what="scores file")
            derived = [scores, scores + ".parts"]
        targets = results_targets(
            self.results_path, derived, RESULTS_FORMAT, "a vtm-jax results file"
        )
        claim_outputs(targets, what="results_path", overwrite=self.overwrite, inputs=inputs)

    @classmethod
    def from_config(
        cls, config: Any, *, devices: int, progress: bool = True, verify: bool = True
    ) -> EvalSpec:
        """The spec a ``vtm-jax eval`` config describes, for ``devices`` devices in all.

        ``dataset_configs.test_batch_size`` is the global batch (default: one video per
        device) and must split evenly over the devices.
        """
        data = config.get("dataset_configs", {})
        options = config.get("eval", {})
        workers = options.get("workers")
        if workers is not None and workers < 1:
            raise UserError(f"eval.workers must be at least 1, not {workers}")
        limit = options.get("limit")
        if limit is not None and limit < 1:
            raise UserError(f"eval.limit must be at least 1 (or unset for all), not {limit}")
        merging = config.get("token_merging")
        split = data.get("split", "test")
        return cls(
            merging=None if merging is None else MergingSettings.from_dict(merging),
            preprocessing=config_preprocessing(data, config.dataset_name, split),
            batch_size=_global_batch(data, devices) // devices,
            num_clips=data.get("num_test_clips", 1),
            three_crops=data.get("do_three_spatial_crops", False),
            results_path=config.get("results_path"),
            attention=options.get("attention", "auto"),
            dtype=options.get("dtype", "float32"),
            limit=limit,
            overwrite=options.get("overwrite", False),
            dataset=f"{config.dataset_name}/{split}",
            softmax_views=config.get("multicrop_softmax_logits", False),
            ensemble=options.get("ensemble", "sum"),
            confusion_matrix=options.get("confusion_matrix", False),
            predictions=options.get("predictions", False),
            save_scores=options.get("save_scores", False),
            workers=workers,
            worker_kind=check_worker_kind(
                options.get("worker_kind", "threads"), "eval.worker_kind"
            ),
            position_embeddings=options.get("position_embeddings", "paper"),
            clips_per_step=options.get("clips_per_step"),
            progress=progress,
            verify=verify,
        )


def _global_batch(data: Any, devices: int) -> int:
    global_batch = data.get("test_batch_size")
    if global_batch is None:
        return devices
    if global_batch < 1:
        raise UserError(f"dataset_configs.test_batch_size must be at least 1, not {global_batch}")
    if global_batch % devices:
        raise UserError(
            f"dataset_configs.test_batch_size {global_batch} is not a multiple of the "
            f"{devices} devices"
        )
    return global_batch


def config_preprocessing(
    data: Any, dataset: str, split: str, keys: Sequence[str] | None = None
) -> dict:
    """The config's preprocessing entries, with what the protocol needs from the dataset: the
    paper's loader for its name, and whether the split is Scenic's multi-view ``test``."""
    from vtm_jax.data.preprocessing import PREPROCESSING_FIELDS
    from vtm_jax.data.protocols import paper_loader_for

    prep = {k: data[k] for k in keys or PREPROCESSING_FIELDS if data.get(k) is not None}
    if prep.get("protocol") == "paper":
        prep.setdefault("paper_loader", paper_loader_for(dataset))
    if prep.get("protocol") == "scenic":
        prep.setdefault("is_test_split", split.partition("[")[0] == "test")
    return prep
