"""What every stand-in model is made of: tokenizers learned offline and the published configs.

Two kinds of stand-ins share these parts: the tiny trained models of the offline profile
(`models.tiny`) and the benchmark's random-weight models of the real shapes (`bench.build`).
Both need tokenizers that treat the control markers as the real ones do, and both attach the
adapters in the published LoRA setup, so those live here once.

A tokenizer can be padded with filler entries up to a real vocabulary size, which gives the
embedding and output layers their real widths. Encoding never produces a filler (no merge or
word piece leads to one); decoding one gives plain ASCII.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

from core.prompts import CONTROL_MARKERS, END_OF_TEXT

if TYPE_CHECKING:
    from peft import LoraConfig
    from tokenizers import Tokenizer
    from transformers import BertTokenizer, GPTNeoXConfig, PreTrainedTokenizerFast

FILLER = "zzfill{}"
SBERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def llm_tokenizer(texts: Iterable[str], learned_vocab: int, *, pad_to: int | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE learned from `texts`, the markers added as whole tokens; `pad_to` entries in all.

    Markers are ordinary (non-special) tokens: decoding with skip_special_tokens keeps them, as it
    keeps the real tokenizer's pieces of "(답변 종료)".
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=learned_vocab,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    markers = [marker for marker in CONTROL_MARKERS if marker != END_OF_TEXT]
    if pad_to is not None:
        backend = _padded(backend, pad_to - len(markers))
    backend.add_tokens([AddedToken(marker, normalized=False, special=False) for marker in markers])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        clean_up_tokenization_spaces=False,
    )
    if pad_to is not None and len(tokenizer) != pad_to:
        raise AssertionError(f"the tokenizer has {len(tokenizer)} entries, not {pad_to}")
    return tokenizer


def _padded(backend: Tokenizer, size: int) -> Tokenizer:
    """The same BPE tokenizer with filler entries appended to its vocabulary up to `size`."""
    from tokenizers import Tokenizer

    state = json.loads(backend.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    for index in range(len(vocab), size):
        vocab[FILLER.format(index)] = index
    return Tokenizer.from_str(json.dumps(state))


def sbert_tokenizer(texts: Iterable[str], learned_vocab: int, *, pad_to: int | None = None) -> BertTokenizer:
    """A WordPiece vocabulary learned from `texts`, in klue/roberta-base's tokenizer setup.

    Like klue's, it neither lower-cases (the S-BERT module does) nor strips accents: stripping
    would decompose every Hangul syllable into jamo and turn Korean into unknown tokens.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizer

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = list(SBERT_SPECIAL_TOKENS)
    trainer = trainers.WordPieceTrainer(vocab_size=learned_vocab, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(texts, trainer)
    # The trainer numbers the word pieces in hash order, which changes from run to run; a
    # WordPiece id means nothing beyond the special tokens, so number the rest alphabetically.
    pieces = sorted(set(backend.get_vocab()) - set(specials))
    fillers = [] if pad_to is None else [FILLER.format(i) for i in range(pad_to - len(specials) - len(pieces))]
    vocab = {piece: index for index, piece in enumerate([*specials, *pieces, *fillers])}
    return BertTokenizer(vocab=vocab, do_lower_case=False, strip_accents=False)


def neox_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    vocab_size: int,
    hidden_size: int,
    layers: int,
    heads: int,
    intermediate_size: int,
    max_positions: int,
) -> GPTNeoXConfig:
    """Polyglot-Ko's architecture (SPEC E.1) at the given size, with the tokenizer's special ids."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        use_parallel_residual=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def lora_config(rank: int, alpha: int) -> LoraConfig:
    """The published adapters' setup (SPEC E.2): LoRA on query_key_value, Gaussian A."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.05,
        init_lora_weights="gaussian",
        target_modules=["query_key_value"],
        task_type="CAUSAL_LM",
    )
