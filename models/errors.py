"""Errors the model layer raises for the composition root to turn into a clear message."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

DEFAULT_FIX_COMMAND = "ohlora download"


class ModelFilesMissing(FileNotFoundError):
    """Checkpoint or data files are not where the layout says.

    Raised before any loader runs, so the user sees every missing file at once together with
    the command that fetches them, instead of a traceback from deep inside a library.
    """

    def __init__(self, missing: Sequence[Path], command: str = DEFAULT_FIX_COMMAND) -> None:
        self.missing: tuple[Path, ...] = tuple(missing)
        self.command = command
        listed = "\n".join(f"  {path}" for path in self.missing)
        super().__init__(f"model files are missing or corrupt:\n{listed}\nrun `{command}` to fetch them")


class CheckpointMismatch(ValueError):
    """A checkpoint's tensors do not fill the model exactly: loading is strict, never partial."""
