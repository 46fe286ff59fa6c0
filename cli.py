#!/usr/bin/env python
"""Run any pipeline stage on its own: `python cli.py --help`, `python cli.py shard -S shard.resolution=32`.

The commands live in `diffusion.cli` (also installed as the `diffusion` console script); dvc.yaml calls
this file so that a stage's command reads the same in the pipeline and by hand.
"""

from diffusion.cli import main

if __name__ == "__main__":
    main()
