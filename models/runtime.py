"""Load every model of one profile from one on-disk layout: the models half of the composition root."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from core.types import Models, TextGenerator
from models.device import resolve_device, resolve_int8
from models.face import load_face_renderer, resolve_precision
from models.hub import PARTS, verify_layout
from models.layout import ModelLayout
from models.llm import load_text_generator
from models.sbert import load_embedder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VllmEndpoint:
    """Where an OpenAI-compatible vLLM serves the four tasks (`OHLORA_VLLM_URL`)."""

    url: str
    api_key: str | None = None
    timeout_s: float = 60.0


def tiny_layout(root: Path) -> ModelLayout:
    """The tiny stand-ins, built on first use (about a minute) and cached under `root`."""
    from models.tiny import ensure_tiny_models

    return ensure_tiny_models(root)


def load_models(
    layout: ModelLayout,
    *,
    device: str = "auto",
    dtype: str = "auto",
    llm_int8: str = "auto",
    face_precision: str = "auto",
    seed: int | None = None,
    default_face: int | None = None,
    verify: bool = True,
    vllm: VllmEndpoint | None = None,
) -> Models:
    """Strict loading of the LLM with its adapters, the S-BERT and the face generator.

    `verify` checks the whole real layout first (the tiny stand-ins carry their own data, which
    the published hashes would reject), so a missing file is one error that names every missing
    file and the command that fetches it, rather than a traceback from deep in a loader.
    `llm_int8` and `face_precision` take the settings' values ("auto" decides by the hardware).
    """
    if verify:
        # With vLLM the base model lives on the GPU host; only the adapters' tokenizer is needed here.
        verify_layout(layout, [part for part in PARTS if not (vllm and part == "llm")])
    logger.info("loading models from %s", layout.root)
    return Models(
        generator=_text_generator(layout, device=device, dtype=dtype, int8=llm_int8, vllm=vllm),
        embedder=load_embedder(layout, device=device),
        renderer=load_face_renderer(
            layout, seed=seed, default_face=default_face, precision=resolve_precision(face_precision)
        ),
    )


def _text_generator(
    layout: ModelLayout, *, device: str, dtype: str, int8: str, vllm: VllmEndpoint | None
) -> TextGenerator:
    if vllm is None:
        int8_on = resolve_int8(int8, resolve_device(device))
        return load_text_generator(layout, device=device, dtype=dtype, int8=int8_on)
    from models.vllm_backend import load_vllm_generator

    return load_vllm_generator(layout, vllm.url, vllm.api_key, timeout_s=vllm.timeout_s)
