"""Shared fixtures: where the reference folder is, and skipping cleanly without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def reference_dir() -> Path:
    configured = os.environ.get("OHLORA_REFERENCE_DIR")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference() -> Path:
    """The checkpoint-compatibility facts; tests that need them skip when the folder is absent."""
    path = reference_dir()
    if not (path / "SPEC.md").is_file():
        pytest.skip(f"reference folder not found at {path} (set OHLORA_REFERENCE_DIR)")
    return path
