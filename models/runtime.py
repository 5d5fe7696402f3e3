"""Load every model of one profile from one on-disk layout: the models half of the composition root."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from core.types import Embedder, FaceRenderer, TextGenerator
from models.layout import ModelLayout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModels:
    generator: TextGenerator
    embedder: Embedder
    renderer: FaceRenderer


def tiny_layout(root: Path) -> ModelLayout:
    """The tiny stand-ins, built on first use (about a minute) and cached under `root`."""
    from models.tiny import ensure_tiny_models

    return ensure_tiny_models(root)


def load_models(
    layout: ModelLayout,
    *,
    device: str = "auto",
    dtype: str = "auto",
    seed: int | None = None,
    default_face: int | None = None,
    verify: bool = True,
) -> LoadedModels:
    """Strict loading of the LLM with its adapters, the S-BERT and the face generator.

    `verify` checks the whole real layout first (the tiny stand-ins carry their own data, which
    the published hashes would reject), so a missing file is one error that names every missing
    file and the command that fetches it, rather than a traceback from deep in a loader.
    """
    from models.face import load_face_renderer
    from models.hub import verify_layout
    from models.llm import load_text_generator
    from models.sbert import load_embedder

    if verify:
        verify_layout(layout)
    logger.info("loading models from %s", layout.root)
    return LoadedModels(
        generator=load_text_generator(layout, device=device, dtype=dtype),
        embedder=load_embedder(layout, device=device),
        renderer=load_face_renderer(layout, seed=seed, default_face=default_face),
    )
