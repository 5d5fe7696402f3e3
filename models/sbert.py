"""The S-BERT memory encoder as an `Embedder`.

The published folder is a sentence-transformers save of klue/roberta-base fine-tuned on
memory/prompt pairs. Upstream did not open it through its modules.json: it built the encoder
from two modules, a transformer reading that folder with max_seq_length 64 and lower-casing, and
a pooling module with mean pooling only (SPEC E.5). It is rebuilt the same way here, so the
embeddings match upstream's whatever the folder's own module list says. Rows are L2-normalised
so that a dot product is the cosine upstream compared against its threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.device import resolve_device
from models.errors import ModelFilesMissing
from models.hub import SBERT_FILES, fix_command, missing_files
from models.layout import ModelLayout

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

MAX_SEQ_LENGTH = 64
BATCH_SIZE = 32


class SentenceEmbedder:
    """Mean-pooled, unit-norm sentence embeddings; used from one worker thread."""

    def __init__(self, model: SentenceTransformer, *, batch_size: int = BATCH_SIZE) -> None:
        self._model = model.eval()
        self._batch_size = batch_size

    @property
    def dimension(self) -> int:
        dimension = self._model.get_embedding_dimension()
        if dimension is None:
            raise ValueError("the encoder does not report its embedding size")
        return dimension

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        embeddings = self._model.encode(
            list(texts),
            batch_size=self._batch_size,
            show_progress_bar=False,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.ascontiguousarray(embeddings, dtype=np.float32)


def load_embedder(layout: ModelLayout, device: str = "auto") -> SentenceEmbedder:
    """Build upstream's two-module encoder over the S-BERT folder of `layout`."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    folder = layout.sbert_dir
    missing = missing_files(folder, SBERT_FILES)
    if missing:
        raise ModelFilesMissing(missing, fix_command(layout.root, ["sbert"]))
    torch_device = resolve_device(device)
    logger.info("loading the S-BERT encoder from %s (%s)", folder, torch_device)
    transformer = Transformer(
        str(folder),
        max_seq_length=MAX_SEQ_LENGTH,
        do_lower_case=True,
        model_kwargs={"local_files_only": True},
        processor_kwargs={"local_files_only": True},
        config_kwargs={"local_files_only": True},
    )
    _require_hangul_tokens(transformer.tokenizer, folder)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    model = SentenceTransformer(modules=[transformer, pooling], device=str(torch_device))
    return SentenceEmbedder(model)


_HANGUL_PROBE = "오로라 떡볶이 좋아해"


def _require_hangul_tokens(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Refuse a tokenizer that turns Korean into unknown tokens.

    transformers 5 rebuilds a BERT tokenizer's normaliser from tokenizer_config.json; with
    do_lower_case true and strip_accents unset it strips accents, which decomposes every Hangul
    syllable into jamo that a Korean vocabulary does not hold. Every memory would then embed alike.
    """
    ids = tokenizer(_HANGUL_PROBE, add_special_tokens=False)["input_ids"]
    if not ids or all(token == tokenizer.unk_token_id for token in ids):
        raise ValueError(
            f"the S-BERT tokenizer in {folder} cannot read Korean (set strip_accents to false in its"
            " tokenizer_config.json)"
        )
