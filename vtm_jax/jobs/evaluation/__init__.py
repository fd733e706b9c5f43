"""Evaluation in parts: the spec of a run, its input, the device loop, metrics and results.

``vtm_jax.jobs.evaluation.evaluate.evaluate`` ties them together:

- :mod:`.spec`: :class:`~.spec.EvalSpec`, everything a run needs besides the checkpoint and
  the dataset, and its mapping from a Scenic-style config;
- :mod:`.input`: the process's examples, read and preprocessed through grain, in host batches;
- :mod:`.loop`: the jitted step over the process's devices and the loop that saves progress;
- :mod:`.state`: :class:`~.state.EvalState`, what a run has counted so far;
- :mod:`.metrics`: top-k counts over views (per head and joint), the table;
- :mod:`.results`: the results file, resume, the multi-host gather and the score files.
"""
