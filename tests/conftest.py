"""Shared fixtures: the reference folder (skipped cleanly without it) and the tiny models.

Torch gets one thread: on two cores, OpenMP threads fighting the subprocess tests and the
inference thread made the same tests up to 50 times slower.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
# python-telegram-bot 22 warns on every RetryAfter unless told to use timedeltas, and warnings are
# errors here; the Telegram adapter opts in the same way in production.
os.environ.setdefault("PTB_TIMEDELTA", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from models.layout import ModelLayout  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def reference_dir() -> Path:
    configured = os.environ.get("OHLORA_REFERENCE_DIR")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "reference"


def golden_sets(pattern: str) -> list[str | None]:
    """The golden fixture files matching `pattern`; [None] makes an empty folder fail loudly, not pass."""
    names: list[str | None] = [path.name for path in sorted((reference_dir() / "golden").glob(pattern))]
    return names or [None]


@pytest.fixture(scope="session")
def reference() -> Path:
    """The checkpoint-compatibility facts; tests that need them skip when the folder is absent."""
    path = reference_dir()
    if not (path / "SPEC.md").is_file():
        pytest.skip(f"reference folder not found at {path} (set OHLORA_REFERENCE_DIR)")
    return path


@pytest.fixture(scope="session")
def tiny_layout(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ModelLayout:
    """The tiny stand-ins, built once per recipe into pytest's cache (or this session's tmp)."""
    from models import tiny

    cache = getattr(request.config, "cache", None)
    parent = Path(cache.mkdir("ohlora-tiny-models")) if cache is not None else tmp_path_factory.getbasetemp()
    return tiny.ensure_tiny_models(parent / "models")


@pytest.fixture(scope="session")
def sampling_generator(tiny_layout: ModelLayout):  # type: ignore[no-untyped-def]
    """The real generator over the tiny layout, sampling as the SPEC says."""
    from models.llm import load_text_generator

    return load_text_generator(tiny_layout, device="cpu", dtype="float32")


@pytest.fixture
def ours():  # type: ignore[no-untyped-def]
    """Our CPU kernels, built on first use; tests that need them skip where they cannot be built."""
    from models import cpu_kernel

    built = cpu_kernel.load()
    if built is None:
        pytest.skip("our CPU kernels need AVX512-VNNI and a C++ compiler; the log says which is missing")
    return built
