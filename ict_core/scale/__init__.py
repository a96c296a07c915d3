"""Scoring and indexing collections past one machine, on Ray Data (`ict score|index --ray`).

An adapter: the images are decoded and cropped by ict_core.preprocess in CPU Ray tasks, scored by
ict_core.scorer.Scorer inside one actor per device, and written as Parquet; it has no scoring logic
of its own. Importing this package (what the CLI does to register --ray) imports neither Ray nor
pyarrow: the plain single-process path never pays for them.
"""
from __future__ import annotations

INSTALL_HINT = 'pip install -e ".[ray]"  (or: pip install "ray[data]")'
