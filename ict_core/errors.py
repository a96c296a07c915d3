"""User-facing errors: each carries one line that says what was wrong and what to do."""


class ICTError(Exception):
    """Base class; ``str(err)`` is the one line shown to the user (CLI, ComfyUI dialog, webui)."""


class ModelFileError(ICTError):
    """A weight file is missing, of the wrong kind or architecture, corrupt, or a pickle."""


class InputError(ICTError):
    """Bad images, prompts or options given by the caller."""
