"""The S-BERT embedder on the tiny encoder: upstream's pooling, normalisation and retrieval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from models import tiny
from models.errors import ModelFilesMissing
from models.layout import ModelLayout
from models.sbert import SentenceEmbedder, load_embedder

THRESHOLD = 0.95
"""The product's retrieval threshold (SPEC E.5)."""


@pytest.fixture(scope="session")
def embedder(tiny_layout: ModelLayout) -> SentenceEmbedder:  # noqa: F811
    return load_embedder(tiny_layout, device="cpu")


def test_rows_are_unit_float32(embedder: SentenceEmbedder) -> None:
    vectors = embedder.encode(["[좋아하는 음식: 떡볶이]", "오늘 저녁 뭐 먹지?", "안녕"])
    assert vectors.dtype == np.float32
    assert vectors.shape == (3, embedder.dimension)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.encode([]).shape == (0, embedder.dimension)


def test_a_batch_equals_its_rows_alone(embedder: SentenceEmbedder) -> None:
    texts = ["짧은 말", "[다음 주 일정: 시험] 나 공부하기 싫어 정말로 너무 너무 싫어", "우산 챙겨야 할까?"]
    together = embedder.encode(texts)
    alone = np.concatenate([embedder.encode([text]) for text in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_mean_pooling_of_the_lower_cased_text(embedder: SentenceEmbedder, tiny_layout: ModelLayout) -> None:  # noqa: F811
    """Upstream's encoder: lower-cased input, mean over real tokens, nothing else (SPEC E.5)."""
    text = "ABC 오늘 날씨 어때?"
    tokenizer = AutoTokenizer.from_pretrained(tiny_layout.sbert_dir)
    model = AutoModel.from_pretrained(tiny_layout.sbert_dir).eval()
    features = tokenizer([text.lower()], return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**features).last_hidden_state
    mask = features["attention_mask"].unsqueeze(-1).float()
    mean = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    np.testing.assert_allclose(embedder.encode([text]), expected, atol=1e-5)


def test_input_is_cut_at_64_tokens(embedder: SentenceEmbedder) -> None:
    long_text = " ".join(["오늘 날씨 어때?"] * 40)
    np.testing.assert_allclose(embedder.encode([long_text]), embedder.encode([long_text + " 떡볶이 먹자"]), atol=1e-6)
    assert not np.allclose(embedder.encode(["오늘 날씨 어때?"]), embedder.encode(["오늘 날씨 어때? 떡볶이 먹자"]))


def test_each_prompt_retrieves_the_memory_it_is_about(embedder: SentenceEmbedder) -> None:
    pairs = [pair for pair in tiny.load_sbert_pairs() if pair.similarity == 1.0]
    memories = sorted({pair.memory for pair in pairs})
    cosines = embedder.encode([pair.prompt for pair in pairs]) @ embedder.encode(memories).T
    for pair, row in zip(pairs, cosines, strict=True):
        best = int(np.argmax(row))
        assert memories[best] == pair.memory, pair.prompt
        assert row[best] >= THRESHOLD, pair.prompt
        assert np.sort(row)[-2] < THRESHOLD, f"{pair.prompt} is close to another memory too"


def test_a_missing_folder_names_the_fix(tmp_path: Path) -> None:
    layout = ModelLayout(tmp_path)
    with pytest.raises(ModelFilesMissing) as caught:
        load_embedder(layout, device="cpu")
    assert str(layout.sbert_dir / "config.json") in str(caught.value)
    assert "ohlora download" in str(caught.value)


def test_a_tokenizer_that_strips_hangul_is_refused(tiny_layout: ModelLayout, tmp_path: Path) -> None:  # noqa: F811
    """transformers 5 rebuilds BERT normalisers from the config: lower-casing there strips accents."""
    layout = ModelLayout(tmp_path)
    shutil.copytree(tiny_layout.sbert_dir, layout.sbert_dir)
    config_file = layout.sbert_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.update(do_lower_case=True, strip_accents=None)
    config_file.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match="cannot read Korean"):
        load_embedder(layout, device="cpu")
