"""Evaluation helpers: image grids (``grid.make_grid``); FID/KID and the attribute judge live beside it."""
