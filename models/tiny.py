"""Tiny offline stand-ins for every model, built in the real on-disk layout in about a minute.

The tiny profile runs the real loading and generation code (`models/llm.py`, `models/sbert.py`,
the face renderer) with no download, so tests and an offline demo exercise the same paths as the
real checkpoints. To make the demo a conversation rather than noise, the stand-ins are trained on
a small shipped dataset (`tiny_data/`, a few dozen rows per task written in the exact training
formats of SPEC E.3.1):

- a byte-level BPE tokenizer learned from that text, with the control markers as whole tokens so
  that a marker always encodes the same way whatever surrounds it;
- a GPT-NeoX base (two layers, hidden 128) and four LoRA adapters on `query_key_value` (the
  published alpha, a small rank), trained together. The base alone is taught to answer any
  prompt with an answer of any task, so that, as with the real base, only the adapters know the
  tasks (the output_message and memory prompts are even identical strings);
- a two-layer BERT sentence encoder trained with a cosine loss on memory/prompt pairs, in
  klue/roberta-base's tokenizer setup.

The LLM is trained on what the models see at inference (SPEC E.3.2): the prompt ends at
"(답변 시작)" and the loss covers only the continuation. The training rows carry "### 답변:" after
that marker, but the published adapters answer without it, so the stand-ins learn the same
behaviour. Summary and eyes_mouth_pose prompts are also trained in the spacing the engine
produces (the cleaned answer keeps its leading and trailing space).

Everything is a pure function of the seed, the dataset and this recipe. A fingerprint of those
(and of the library versions) is stored next to the models; a different fingerprint rebuilds. The
build happens in a temporary folder beside `root` that is renamed into place, so a reader never
sees half a build and two processes building at once both end with one complete copy.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from core.prompts import (
    ANSWER_END,
    ANSWER_MARKER,
    ANSWER_START,
    CONTROL_MARKERS,
    RESPONSE_MARKER,
    SUMMARY_PREFIX,
    compose_final_input,
    task_prompt,
)
from core.types import Task
from models.layout import TASKS, ModelLayout
from models.stand_ins import llm_tokenizer, lora_config, neox_config, sbert_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).with_name("tiny_data")
FINGERPRINT_FILE = "tiny_recipe.sha256"
RECIPE_VERSION = "1"

_LIBRARIES = ("torch", "transformers", "peft", "tokenizers", "sentence-transformers", "safetensors", "numpy")
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_RECIPE_SOURCES = (
    _PACKAGE_ROOT / "models" / "tiny.py",
    _PACKAGE_ROOT / "models" / "stand_ins.py",
    _PACKAGE_ROOT / "core" / "prompts.py",  # the prompts the adapters are trained on
    _PACKAGE_ROOT / "models" / "tiny_face.py",  # and the architectures whose checkpoints it writes
    _PACKAGE_ROOT / "models" / "stylegan.py",
    _PACKAGE_ROOT / "models" / "property_cnn.py",
    _PACKAGE_ROOT / "models" / "vectorfind.py",
)


@dataclass(frozen=True)
class LlmRecipe:
    """Sized so that the whole build takes well under a minute on two idle CPU cores."""

    vocab_size: int = 1536
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 128
    lora_rank: int = 8
    lora_alpha: int = 16
    """The published adapters' alpha (SPEC E.2)."""
    sharpen: float = 2.0
    """Output-head scale applied after training; see `build_tiny_llm`."""
    steps: int = 160
    batch_size: int = 16
    learning_rate: float = 5e-3


@dataclass(frozen=True)
class SbertRecipe:
    vocab_size: int = 768
    hidden_size: int = 64
    layers: int = 2
    heads: int = 2
    intermediate_size: int = 128
    max_seq_length: int = 64
    """Upstream's setting (SPEC E.5)."""
    steps: int = 150
    learning_rate: float = 4e-3


LLM_RECIPE = LlmRecipe()
SBERT_RECIPE = SbertRecipe()


@dataclass(frozen=True)
class Example:
    """One training pair: a prompt as the model sees it and the continuation it should write."""

    task: Task
    prompt: str
    completion: str


def ensure_tiny_models(root: Path, *, seed: int = 0) -> ModelLayout:
    """The tiny models under `root`, built first if they are missing or from another recipe."""
    root = Path(root)
    fingerprint = recipe_fingerprint(seed)
    if _is_current(root, fingerprint):
        return ModelLayout(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        logger.info("building the tiny models into %s", root)
        build_tiny_models(ModelLayout(staging), seed=seed)
        (staging / FINGERPRINT_FILE).write_text(fingerprint + "\n", encoding="utf-8")
        _publish(staging, root, fingerprint)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ModelLayout(root)


def build_tiny_models(
    layout: ModelLayout,
    *,
    seed: int = 0,
    llm_recipe: LlmRecipe = LLM_RECIPE,
    sbert_recipe: SbertRecipe = SBERT_RECIPE,
) -> None:
    """Write every tiny model into `layout` (no caching: see `ensure_tiny_models`)."""
    from models.tiny_face import build_tiny_face_assets

    # Model initialisation draws from torch's global generator: fork it so that the build is
    # seeded and the caller's random state is left as it was. One thread: these matrices are too
    # small to gain from two, and OpenMP threads that spin on a busy machine made the build ten
    # times slower; it also keeps the arithmetic, hence the files, independent of the core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            build_tiny_llm(layout, load_examples(), llm_recipe)
            torch.manual_seed(seed)
            build_tiny_sbert(layout, load_sbert_pairs(), sbert_recipe)
    finally:
        torch.set_num_threads(threads)
    build_tiny_face_assets(layout, seed=seed)


def recipe_fingerprint(seed: int) -> str:
    """Changes whenever anything that shapes the built files changes."""
    digest = hashlib.sha256()
    digest.update(f"recipe {RECIPE_VERSION} seed {seed}\n".encode())
    for library in _LIBRARIES:
        digest.update(f"{library} {importlib.metadata.version(library)}\n".encode())
    for source in [*_RECIPE_SOURCES, *sorted(DATA_DIR.glob("*.jsonl"))]:
        digest.update(source.name.encode() + b"\n" + source.read_bytes())
    return digest.hexdigest()


def _is_current(root: Path, fingerprint: str) -> bool:
    marker = root / FINGERPRINT_FILE
    return marker.is_file() and marker.read_text(encoding="utf-8").strip() == fingerprint


def _publish(staging: Path, root: Path, fingerprint: str) -> None:
    """Move a finished build to `root`, replacing a stale one; a concurrent fresh one wins."""
    for _ in range(5):
        try:
            os.rename(staging, root)
            return
        except OSError:
            if _is_current(root, fingerprint):
                return
        stale = root.with_name(f".{root.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(root, stale)
        except FileNotFoundError:
            continue
        shutil.rmtree(stale, ignore_errors=True)
    raise RuntimeError(f"could not move the tiny models into {root}")


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


def training_texts(task: Task) -> list[str]:
    """The shipped rows of one task, each exactly a training text of SPEC E.3.1."""
    path = DATA_DIR / f"{task.value}.jsonl"
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_examples() -> list[Example]:
    """Prompt/continuation pairs of every task, as trained and as the engine composes them.

    Besides each row as written, the recipe trains each plain user text once more behind a
    summary of another row, as the engine sends it from the second turn on; without that the
    stand-ins only behave on a conversation's first turn.
    """
    summaries = [_answer_of(completion) for _, completion in map(split_training_text, training_texts(Task.SUMMARY))]
    examples: list[Example] = []
    for task in TASKS:
        for index, text in enumerate(training_texts(task)):
            prompt, completion = split_training_text(text)
            variants = [prompt, _engine_prompt(task, prompt)]
            if task is not Task.EYES_MOUTH_POSE:
                earlier = summaries[(7 * index + 3) % len(summaries)]
                variants.append(_behind_summary(variants[-1], earlier))
            examples.extend(Example(task, variant, completion) for variant in dict.fromkeys(variants))
    return examples


def split_training_text(text: str) -> tuple[str, str]:
    """("… (답변 시작)", " answer (답변 종료) <|endoftext|>"): the response marker is dropped."""
    prompt, answer = text.split(ANSWER_START + RESPONSE_MARKER, 1)
    return prompt + ANSWER_START, " " + answer


def _answer_of(completion: str) -> str:
    return completion.split(ANSWER_END)[0].strip()


def _behind_summary(prompt: str, summary: str) -> str:
    """`prompt` with its user text behind `summary`, unless it already carries a memory or summary."""
    if prompt.startswith(("[", SUMMARY_PREFIX)):
        return prompt
    return compose_final_input(prompt, memory=None, summary=summary)


def _engine_prompt(task: Task, prompt: str) -> str:
    """The same prompt as `core.prompts` builds it from a cleaned answer (" answer ")."""
    body = prompt.removesuffix(ANSWER_START)
    if task is Task.SUMMARY:
        final_input, answer = body.split(ANSWER_MARKER + " ", 1)
        return task_prompt(task, final_input, f" {answer} ")
    if task is Task.EYES_MOUTH_POSE:
        return task_prompt(task, "", f" {body} ")
    return task_prompt(task, body)


@dataclass(frozen=True)
class SbertPair:
    memory: str
    prompt: str
    similarity: float


def load_sbert_pairs() -> list[SbertPair]:
    """Memory line, user prompt and target cosine, as upstream's S-BERT training CSV has them."""
    rows = (DATA_DIR / "sbert_pairs.jsonl").read_text(encoding="utf-8").splitlines()
    return [
        SbertPair(row["memory_0"], row["user_prompt_1"], float(row["similarity_score"]))
        for row in map(json.loads, rows)
        if row
    ]


def corpus() -> Iterator[str]:
    """Every shipped text with the markers taken out: they become whole tokens, not merges."""
    for task in TASKS:
        for text in training_texts(task):
            for marker in CONTROL_MARKERS:
                text = text.replace(marker, " ")
            yield text
    for pair in load_sbert_pairs():
        yield pair.memory
        yield pair.prompt


# ---------------------------------------------------------------------------------------------
# The language model
# ---------------------------------------------------------------------------------------------


def build_tiny_llm(layout: ModelLayout, examples: Sequence[Example], recipe: LlmRecipe = LLM_RECIPE) -> None:
    from peft import get_peft_model
    from transformers import GPTNeoXForCausalLM

    tokenizer = llm_tokenizer(corpus(), recipe.vocab_size)
    config = neox_config(
        tokenizer,
        vocab_size=_round_up(len(tokenizer), 64),
        hidden_size=recipe.hidden_size,
        layers=recipe.layers,
        heads=recipe.heads,
        intermediate_size=recipe.intermediate_size,
        max_positions=recipe.max_positions,
    )
    initial = GPTNeoXForCausalLM(config)
    lora = lora_config(recipe.lora_rank, recipe.lora_alpha)
    model = get_peft_model(initial, lora, adapter_name=TASKS[0].value)
    for task in TASKS[1:]:
        model.add_adapter(task.value, lora)
    for parameter in model.parameters():
        parameter.requires_grad_(True)

    batches = {task: _encode(tokenizer, [e for e in examples if e.task is task]) for task in TASKS}
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.learning_rate, total_steps=recipe.steps, pct_start=0.1
    )
    model.train()
    for step in range(recipe.steps):
        optimizer.zero_grad(set_to_none=True)
        for task in TASKS:
            model.set_adapter(task.value)
            _batch_loss(model, batches[task], recipe.batch_size).backward()
        # The base alone learns to answer any prompt with an answer of any task, so it knows the
        # language and the markers but not the tasks: only the adapters carry those, as with the
        # real base, and a row that silently lost its adapter shows in the output.
        with model.disable_adapter():
            loss = _batch_loss(model, _encode(tokenizer, _mismatched(examples, recipe.batch_size)), recipe.batch_size)
            loss.backward()
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == recipe.steps - 1:
            logger.debug("tiny LLM step %d: base loss %.3f", step, loss.item())
    model.eval()

    for task in TASKS:
        folder = layout.adapter_dir(task)
        with tempfile.TemporaryDirectory() as scratch:
            model.save_pretrained(scratch, selected_adapters=[task.value])
            # PEFT writes a non-default adapter into a subfolder named after it.
            shutil.move(str(Path(scratch) / task.value), str(folder))
        _point_adapter_at_author_disk(folder)
        tokenizer.save_pretrained(folder)
    base = cast(GPTNeoXForCausalLM, model.unload())
    # A minute of training leaves the distributions much flatter than the published adapters',
    # and eyes_mouth_pose is sampled at temperature 1.5: scaling the output head makes every
    # temperature act as half as hot, which keeps sampled answers in format (about 17 % of
    # eyes_mouth_pose samples were valid without it, 99 % with it).
    with torch.no_grad():
        base.lm_head.weight.mul_(recipe.sharpen)
    base.save_pretrained(layout.base_model_dir)
    tokenizer.save_pretrained(layout.base_model_dir)


def _encode(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, mask and labels with the prompt and padding masked out (-100)."""
    rows = []
    for example in examples:
        prompt_ids = tokenizer.encode(example.prompt)
        completion_ids = tokenizer.encode(example.completion)
        rows.append((prompt_ids + completion_ids, len(prompt_ids)))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, prompt_length) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, prompt_length : len(ids)] = torch.tensor(ids[prompt_length:])
    return input_ids, attention_mask, labels


def _batch_loss(
    model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], size: int
) -> torch.Tensor:
    input_ids, attention_mask, labels = batch
    rows = torch.randperm(len(input_ids))[:size]
    return model(input_ids=input_ids[rows], attention_mask=attention_mask[rows], labels=labels[rows]).loss


def _mismatched(examples: Sequence[Example], size: int) -> list[Example]:
    """Prompts paired with the continuations of randomly chosen other examples."""
    prompts = torch.randperm(len(examples))[:size].tolist()
    answers = torch.randperm(len(examples))[:size].tolist()
    return [
        Example(examples[p].task, examples[p].prompt, examples[a].completion)
        for p, a in zip(prompts, answers, strict=True)
    ]


def _point_adapter_at_author_disk(folder: Path) -> None:
    """Record a base path that does not exist, as the published adapters do (SPEC E.1)."""
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = "/home/author/llm/models/polyglot_original"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# ---------------------------------------------------------------------------------------------
# The sentence encoder
# ---------------------------------------------------------------------------------------------


def build_tiny_sbert(layout: ModelLayout, pairs: Sequence[SbertPair], recipe: SbertRecipe = SBERT_RECIPE) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel

    with tempfile.TemporaryDirectory() as initial:
        tokenizer = sbert_tokenizer(corpus(), recipe.vocab_size)
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=recipe.hidden_size,
            num_hidden_layers=recipe.layers,
            num_attention_heads=recipe.heads,
            intermediate_size=recipe.intermediate_size,
            max_position_embeddings=2 * recipe.max_seq_length,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=tokenizer.pad_token_id,
        )
        BertModel(config).save_pretrained(initial)
        tokenizer.save_pretrained(initial)
        transformer = Transformer(initial, max_seq_length=recipe.max_seq_length, do_lower_case=True)
    model = SentenceTransformer(modules=[transformer, Pooling(recipe.hidden_size, pooling_mode="mean")], device="cpu")

    # Every memory against every prompt: a pair the dataset does not list counts as unrelated,
    # which keeps a prompt away from all the memories it is not about, not just the listed ones.
    memories = sorted({pair.memory for pair in pairs})
    prompts = sorted({pair.prompt for pair in pairs})
    targets = torch.zeros(len(memories), len(prompts))
    for pair in pairs:
        targets[memories.index(pair.memory), prompts.index(pair.prompt)] = pair.similarity
    memory_features = model.preprocess(memories)
    prompt_features = model.preprocess(prompts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate)
    model.train()
    for _ in range(recipe.steps):
        optimizer.zero_grad(set_to_none=True)
        left = torch.nn.functional.normalize(model(dict(memory_features))["sentence_embedding"], dim=-1)
        right = torch.nn.functional.normalize(model(dict(prompt_features))["sentence_embedding"], dim=-1)
        torch.nn.functional.mse_loss(left @ right.T, targets).backward()
        optimizer.step()
    model.eval()
    model.save(str(layout.sbert_dir), create_model_card=False)
