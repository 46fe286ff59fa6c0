#!/usr/bin/env python
"""Run any pipeline stage on its own: `python cli.py --help`, `python cli.py shard -S shard.resolution=32`.

The commands live in `diffusion.cli` (also installed as the `diffusion` console script); dvc.yaml calls
this file so that a stage's command reads the same in the pipeline and by hand.
"""

import sys
from pathlib import Path

# This checkout's own src/ first: a queued or --temp DVC experiment runs in a copy of the repository, and the
# editable install (`pip install -e .`) would otherwise import the workspace's src/, not the experiment's code.
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from diffusion.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
