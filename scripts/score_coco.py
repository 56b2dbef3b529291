"""Score COCO-format prediction files offline (panoptic PQ, mask AP): ``python scripts/score_coco.py --help``.

The scorer is :mod:`proscale.tasks.score_coco` (also ``python -m proscale.tasks.score_coco``).
"""

import sys

from proscale.tasks.score_coco import main

if __name__ == "__main__":
    sys.exit(main())
