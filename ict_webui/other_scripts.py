"""Scripts of the webui's *Script* dropdown that need every image of the batch in its place.

Prompt matrix labels its grid by position (and fails with "bad number of horizontal texts" when images are
missing); X/Y/Z plot puts image ``i`` of each run in cell ``i`` of its grid; SD upscale stitches tile ``i`` back at
place ``i``. With one of them selected, removing or reordering images breaks their result, so the extension only
writes the scores (annotate) and says so.

The selected script is found as the webui's ``ScriptRunner.run`` finds it: ``p.script_args[0]`` is its index + 1 in
``p.scripts.selectable_scripts`` (A1111 1.x, Forge main / Classic / Neo; the API fills ``script_args`` the same way).
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# lower-case titles (A1111 writes "Prompt matrix", Forge Classic "Prompt Matrix") and their file names
POSITIONAL_TITLES = ("prompt matrix", "x/y/z plot", "x/y plot", "sd upscale")
POSITIONAL_FILES = ("prompt_matrix.py", "xyz_grid.py", "xy_grid.py", "sd_upscale.py")
PLOT_TITLES, PLOT_FILES = ("x/y/z plot", "x/y plot"), ("xyz_grid.py", "xy_grid.py")   # one generation per cell


def selected_script(p: Any) -> Any:
    """The script chosen in the dropdown for this generation, or None."""
    runner = getattr(p, "scripts", None)
    args = getattr(p, "script_args", None)
    scripts = getattr(runner, "selectable_scripts", None)
    try:
        index = int(args[0]) if args else 0
    except (TypeError, ValueError, IndexError):
        return None
    if not scripts or index <= 0 or index > len(scripts):
        return None
    return scripts[index - 1]


def _title(script: Any) -> str:
    try:
        return str(script.title())
    except Exception:
        return type(script).__name__


def _filename(script: Any) -> str:
    return str(getattr(script, "filename", "") or "").replace("\\", "/").rsplit("/", 1)[-1].lower()


def is_plot(script: Any) -> bool:
    """Whether ``script`` is X/Y/Z (or X/Y) plot, which builds its result from one generation per cell."""
    return _title(script).strip().lower() in PLOT_TITLES or _filename(script) in PLOT_FILES


def positional_script(p: Any) -> str | None:
    """The title of the selected script when it needs every image in place, else None."""
    script = selected_script(p)
    if script is None:
        return None
    title = _title(script)
    filename = _filename(script)
    if title.strip().lower() in POSITIONAL_TITLES or filename in POSITIONAL_FILES:
        return title
    return None
