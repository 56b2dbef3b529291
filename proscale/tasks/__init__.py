"""The apps' tasks, one module each: ``train`` (fit, test, ``results.json``), ``eval`` (score weights on a dataset),
``predict`` (COCO files and overlays for images, no dataset needed) and ``score_coco`` (score COCO-format files
offline). ``run`` holds what train and eval build a run from; ``stored_run`` what eval and predict read from the
weights. Entry points: :mod:`proscale.cli` (``proscale <app>``) and the thin ``scripts/*.py`` wrappers.
"""
