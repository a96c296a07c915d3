"""Where one generation's image lands in an X/Y/Z plot, so the API's score list can follow the plot's images.

X/Y/Z plot (A1111 ``scripts/xyz_grid.py``, Forge Classic ``extensions-builtin/xyz``) runs one generation per
cell, each on a shallow copy of ``p`` (so every cell shares one ``extra_generation_params`` dict, the one the
API's ``info`` shows at the end), takes the first image each cell returns, and puts it at position
``ix + iy * len(xs) + iz * len(xs) * len(ys)``, which is not the order the cells run in when a costly axis is
processed first. It returns ``[grid, sub-grids (with "Include sub grids"), cell images (with "Include sub
images")]``. No hook runs after the plot is assembled, so each cell finds its own place from the call that made
it: the frame of X/Y/Z's ``cell(x, y, z, ix, iy, iz)`` (its axis values ``xs``, ``ys``, ``zs``) and of its ``run``
(``include_lone_images``, ``include_sub_grids``).
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MAX_DEPTH = 80          # frames looked through; the cell is ~10 frames above the extension's hook


@dataclass(frozen=True)
class PlotCell:
    """One cell of an X/Y/Z plot, and the shape of what the plot returns."""
    index: int                  # the cell's place among the cell images
    cells: int                  # len(xs) * len(ys) * len(zs)
    sub_grids: int              # sub-grids returned before the cell images (0 without "Include sub grids")
    lone_images: bool           # whether the cell images are returned at all ("Include sub images")

    def api_values(self, before: Sequence[Any] | None, value: Any) -> list:
        """The plot's list for the API's info after this cell: one entry per image after the main grid (None for a
        sub-grid, or a cell whose first image is a grid or unscored), ``before`` being the list so far."""
        n = self.sub_grids + (self.cells if self.lone_images else 0)
        out = list(before) if before is not None and len(before) == n else [None] * n
        if self.lone_images:
            out[self.sub_grids + self.index] = value
        return out


def _ints(f: dict, *names: str) -> bool:
    return all(isinstance(f.get(n), int) and not isinstance(f.get(n), bool) for n in names)


def _sized(f: dict, *names: str) -> bool:
    return all(hasattr(f.get(n), "__len__") for n in names)


def find_cell(start: Any = None) -> PlotCell | None:
    """The X/Y/Z cell whose generation is running, from the call stack; None outside a plot (or an X/Y/Z whose
    code does not look like A1111's; the caller then writes no list)."""
    frame = start if start is not None else sys._getframe(1)
    cell = None
    for _ in range(MAX_DEPTH):
        if frame is None:
            return None
        f = frame.f_locals
        if cell is None:
            if frame.f_code.co_name == "cell" and _ints(f, "ix", "iy", "iz") and _sized(f, "xs", "ys", "zs"):
                cell = f
        elif "include_lone_images" in f and "include_sub_grids" in f:
            nx, ny, nz = len(cell["xs"]), len(cell["ys"]), len(cell["zs"])
            index = cell["ix"] + cell["iy"] * nx + cell["iz"] * nx * ny
            if not 0 <= index < nx * ny * nz:
                return None
            return PlotCell(index=index, cells=nx * ny * nz, sub_grids=nz if f["include_sub_grids"] else 0,
                            lone_images=bool(f["include_lone_images"]))
        frame = frame.f_back
    return None
