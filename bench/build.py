"""Random-weight models of the real shapes, written in the real on-disk layout.

Both sides of the benchmark load these files with the code they would use on the published
checkpoints, so loading, memory and speed are those of the real thing; only the numbers in the
tensors are random. The tokenizers are learned offline from the shipped tiny dataset and padded
with filler entries to the real vocabulary sizes (`models.stand_ins`), so embedding and output
layers have their real widths.

Random weights would, once in a long while, sample the end-of-text token or an end marker and
stop a generation early. Their rows of the output layer are zeroed: a logit of exactly 0 is
never among the top 50 of 30,080 random logits, so every generation runs its full length.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bench.config import LlmShape, Profile, SbertShape
from core.prompts import ANSWER_END
from models.layout import TASKS, ModelLayout
from models.stand_ins import llm_tokenizer, lora_config, neox_config, sbert_tokenizer
from models.stylegan import Generator, GeneratorConfig, config_path
from models.tiny import corpus
from models.tiny_face import build_tiny_face_assets

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

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
        tokenizer = bench_llm_tokenizer(profile.llm)
        build_llm(layout, profile.llm, tokenizer, seed=seed)
        build_sbert(layout, profile.sbert)
    build_face(layout, profile.face, seed=seed)
    return layout


# ---------------------------------------------------------------------------------------------
# The LLM


def bench_llm_tokenizer(shape: LlmShape) -> PreTrainedTokenizerFast:
    """Learned from the shipped text, padded to the shape's vocabulary."""
    return llm_tokenizer(corpus(), LLM_MERGES_VOCAB, pad_to=shape.vocab)


def build_llm(layout: ModelLayout, shape: LlmShape, tokenizer: PreTrainedTokenizerFast, *, seed: int) -> None:
    """The GPT-NeoX base (bfloat16) and four LoRA adapters, saved as the published folders are."""
    from peft import get_peft_model
    from transformers import GPTNeoXForCausalLM

    config = neox_config(
        tokenizer,
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        layers=shape.layers,
        heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_positions=shape.max_positions,
    )
    config.dtype = torch.bfloat16
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

    lora = lora_config(shape.lora_rank, shape.lora_alpha)
    peft_model = get_peft_model(model, lora, adapter_name=TASKS[0].value)
    for task in TASKS[1:]:
        peft_model.add_adapter(task.value, lora)
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


def build_sbert(layout: ModelLayout, shape: SbertShape) -> None:
    """A RoBERTa encoder of klue/roberta-base's shape with random weights."""
    from transformers import RobertaConfig, RobertaModel

    tokenizer = sbert_tokenizer(corpus(), min(SBERT_LEARNED_VOCAB, shape.vocab), pad_to=shape.vocab)
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
