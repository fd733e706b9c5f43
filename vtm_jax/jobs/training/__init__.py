"""Training in parts: the optimiser and schedule, pure steps over a train state, grain input.

``vtm_jax.jobs.training.train.train`` ties them together:

- :mod:`.optim`: the learning-rate schedule and the optimiser a config names;
- :mod:`.steps`: the train state and the module-level pure ``train_step`` (the test accuracy
  is evaluation's own step, ``evaluation.loop.compiled_step``);
- :mod:`.input`: the training batches, streamed through grain in a fixed order per step.
"""
