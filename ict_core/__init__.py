"""ict_core: host-independent ICT / HP reward scoring (no ComfyUI or webui imports)."""
from .errors import ICTError, InputError, ModelFileError
from .ranking import BY, Selection, rank, report, select, values
from .scorer import ImageFeatures, Scorer, ScoreResult

__version__ = "0.1.0"
__all__ = ["ICTError", "InputError", "ModelFileError", "BY", "Selection", "rank", "report", "select", "values",
           "ImageFeatures", "Scorer", "ScoreResult", "__version__"]
