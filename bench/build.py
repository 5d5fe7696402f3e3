"""Random-weight models of the real shapes, written in the real on-disk layout.

Both sides of the benchmark load these files with the code they would use on the published
checkpoints, so loading, memory and speed are those of the real thing; only the numbers in the
tensors are random. The tokenizers are learned offline from the shipped tiny dataset and padded
with filler entries to the real vocabulary sizes, so embedding and output layers have their real
widths.

Random weights would, once in a long while, sample the end-of-text token or an end marker and
stop a generation early. Their rows of the output layer are zeroed: a logit of exactly 0 is
never among the top 50 of 30,080 random logits, so every generation runs its full length.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from bench.config import LlmShape, Profile, SbertShape
from core.prompts import ANSWER_END, CONTROL_MARKERS, END_OF_TEXT
from models.layout import TASKS, ModelLayout
from models.stylegan import Generator, GeneratorConfig, config_path
from models.tiny import load_sbert_pairs, training_texts
from models.tiny_face import build_tiny_face_assets

logger = logging.getLogger(__name__)

LLM_MERGES_VOCAB = 1536
"""Learned BPE entries; the small corpus gives mostly whole words. The rest is filler."""
SBERT_LEARNED_VOCAB = 1024
INIT_STD = 0.02
LORA_B_STD = 0.02
"""PEFT starts lora_B at zero; trained adapters are not, and a zero matrix would hide their cost
from the accuracy comparison."""
NOISE_AND_BIAS_STD = 0.2
"""The generator's init leaves noise strengths and biases at zero, which makes its constant
input spatially flat; trained models are not like that."""
_FILLER = "zzfill{}"


def quiet_libraries() -> None:
    """No progress bars in the bench's log, and no warning PEFT triggers in transformers 5."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def build_bench_models(root: Path, profile: Profile, *, seed: int = 0) -> ModelLayout:
    """Write every model of `profile` under `root` and return the layout."""
    layout = ModelLayout(Path(root))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = llm_tokenizer(profile.llm.vocab)
        build_llm(layout, profile.llm, tokenizer, seed=seed)
        build_sbert(layout, profile.sbert)
    build_face(layout, profile.face, seed=seed)
    return layout


def corpus() -> Iterator[str]:
    """The shipped Korean texts with the control markers taken out."""
    for task in TASKS:
        for text in training_texts(task):
            for marker in CONTROL_MARKERS:
                text = text.replace(marker, " ")
            yield text
    for pair in load_sbert_pairs():
        yield pair.memory
        yield pair.prompt


# ---------------------------------------------------------------------------------------------
# The LLM


def llm_tokenizer(vocab_size: int):  # type: ignore[no-untyped-def]
    """Byte-level BPE with the markers as whole tokens, exactly `vocab_size` entries."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=LLM_MERGES_VOCAB,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer)
    markers = [marker for marker in CONTROL_MARKERS if marker != END_OF_TEXT]
    backend = _padded(backend, vocab_size - len(markers))
    backend.add_tokens([AddedToken(marker, normalized=False, special=False) for marker in markers])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        clean_up_tokenization_spaces=False,
    )
    if len(tokenizer) != vocab_size:
        raise AssertionError(f"tokenizer has {len(tokenizer)} entries, not {vocab_size}")
    return tokenizer


def _padded(backend, size: int):  # type: ignore[no-untyped-def]
    """The same tokenizer with filler entries appended to its model vocabulary up to `size`.

    Encoding never produces a filler (no merge leads to one); decoding one gives plain ASCII.
    """
    from tokenizers import Tokenizer

    state = json.loads(backend.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    for index in range(len(vocab), size):
        vocab[_FILLER.format(index)] = index
    return Tokenizer.from_str(json.dumps(state))


def build_llm(layout: ModelLayout, shape: LlmShape, tokenizer, *, seed: int) -> None:  # type: ignore[no-untyped-def]
    """The GPT-NeoX base (bfloat16) and four LoRA adapters, saved as the published folders are."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=shape.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )
    # Built on the meta device and materialised in bfloat16: a float32 detour would need twice
    # the memory (10 GB for the real size).
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    model = torch.nn.Module.to(model, torch.bfloat16).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, INIT_STD, generator=generator)
            elif name.endswith("weight"):  # layer norms
                parameter.fill_(1.0)
            else:
                parameter.zero_()
        never_sampled = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(ANSWER_END)]
        model.get_output_embeddings().weight[never_sampled] = 0.0
    model.save_pretrained(layout.base_model_dir)
    tokenizer.save_pretrained(layout.base_model_dir)

    def lora() -> LoraConfig:
        return LoraConfig(
            r=shape.lora_rank,
            lora_alpha=shape.lora_alpha,
            lora_dropout=0.05,
            init_lora_weights="gaussian",
            target_modules=["query_key_value"],
            task_type="CAUSAL_LM",
        )

    peft_model = get_peft_model(model, lora(), adapter_name=TASKS[0].value)
    for task in TASKS[1:]:
        peft_model.add_adapter(task.value, lora())
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(0.0, LORA_B_STD, generator=generator)
    for task in TASKS:
        peft_model.save_pretrained(str(layout.llm_dir), selected_adapters=[task.value])
        # PEFT writes an adapter not named "default" into a subfolder named after it.
        shutil.move(str(layout.llm_dir / task.value), str(layout.adapter_dir(task)))
        tokenizer.save_pretrained(layout.adapter_dir(task))


# ---------------------------------------------------------------------------------------------
# S-BERT


def sbert_tokenizer(vocab_size: int):  # type: ignore[no-untyped-def]
    """WordPiece set up as klue/roberta-base's, learned offline and padded to `vocab_size`.

    Like klue's it neither lower-cases (the S-BERT module does) nor strips accents, which would
    decompose every Hangul syllable into jamo that the vocabulary does not hold.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizer

    specials = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=min(SBERT_LEARNED_VOCAB, vocab_size), special_tokens=specials, show_progress=False
    )
    backend.train_from_iterator(corpus(), trainer)
    pieces = sorted(set(backend.get_vocab()) - set(specials))
    fillers = [_FILLER.format(index) for index in range(vocab_size - len(specials) - len(pieces))]
    vocab = {piece: index for index, piece in enumerate([*specials, *pieces, *fillers])}
    return BertTokenizer(vocab=vocab, do_lower_case=False, strip_accents=False)


def build_sbert(layout: ModelLayout, shape: SbertShape) -> None:
    """A RoBERTa encoder of klue/roberta-base's shape with random weights."""
    from transformers import RobertaConfig, RobertaModel

    tokenizer = sbert_tokenizer(shape.vocab)
    config = RobertaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    RobertaModel(config).save_pretrained(layout.sbert_dir)
    tokenizer.save_pretrained(layout.sbert_dir)


# ---------------------------------------------------------------------------------------------
# The face generator


def build_face(layout: ModelLayout, config: GeneratorConfig, *, seed: int) -> None:
    """The VectorFind data files of the tiny stand-ins, with a random generator of `config`."""
    build_tiny_face_assets(layout, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = Generator(config)
        with torch.no_grad():
            for name, parameter in generator.named_parameters():
                if name.startswith("synthesis.") and name.endswith(("bias", "apply_noise.weight")):
                    parameter.normal_(0.0, NOISE_AND_BIAS_STD)
    torch.save(generator.state_dict(), layout.generator_path)
    sidecar = config_path(layout.generator_path)
    if config == GeneratorConfig():
        sidecar.unlink(missing_ok=True)
    else:
        sidecar.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    layout.property_cnn_path.unlink(missing_ok=True)
