"""Test aids, for this project's tests and for users' own: small valid datasets and predictions written from code,
and callbacks that make multi-process runs comparable with single-process ones.

- :mod:`proscale.testing.data`: ``write_coco_panoptic`` writes a tiny COCO-panoptic dataset (images, PNGs, JSON)
  from a list of samples, for loader and validation tests.
- :mod:`proscale.testing.metrics`: ``random_pair`` / ``prediction_from_gt`` make ground truth and predictions
  with known scores (PQ = 100 for a prediction built from its ground truth), for scorer tests and benchmarks.
- :mod:`proscale.testing.callbacks`: callbacks added from the command line (``+callbacks.<name>._target_=...``)
  to runs a test cannot inject code into (torchrun, submitit, subprocesses): fixed random point draws and
  oneDNN off (``BatchInvariantRun``), a log of checkpoint writes, a self-sent signal at a step.

Nothing in the training, evaluation or prediction code imports this package.
"""
