"""Fold each LoRA adapter into its own copy of the base: the four models a vLLM host can serve.

vLLM's GPT-NeoX implementation does not support LoRA (its `GPTNeoXForCausalLM` is not a
`SupportsLoRA` model, and it reorders the fused `query_key_value` rows at load time, which a
LoRA B matrix in the Hugging Face row order would also need). So the scale-out deployment serves
four merged full models, W' = W + (alpha / r) * B A on every `query_key_value`, one vLLM
process each; `models/vllm_backend.py` talks to them by task name.

Merging runs on the CPU, one task at a time from a fresh copy of the base, so the peak memory is
one float32 model (about 5.5 GB for Polyglot-Ko 1.3B) and no adapter ever sees another's weights.
The arithmetic is done in float32 and rounded to the serving dtype once, at the end.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

from core.types import Task
from models.errors import CheckpointMismatch, ModelFilesMissing
from models.hub import fix_command, layout_problems
from models.layout import TASKS, ModelLayout

if TYPE_CHECKING:
    import torch
    from peft import PeftModelForCausalLM
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


def merged_model_dir(out_dir: Path, task: Task) -> Path:
    return out_dir / f"polyglot_{task.value}_merged"


def export_merged(
    layout: ModelLayout,
    out_dir: Path,
    *,
    dtype: torch.dtype | None = None,
    tasks: Sequence[Task] = TASKS,
) -> dict[Task, Path]:
    """Write one merged model folder per task (weights, config, the adapter's tokenizer).

    `dtype` is what the folders store: bfloat16 by default, the dtype the adapters were trained
    in and the one vLLM serves them in. Each folder is written under a temporary name and renamed
    when complete, so an interrupted export never leaves a folder that looks servable.
    """
    import torch

    problems = layout_problems(layout, ["llm"])
    if problems:
        raise ModelFilesMissing(problems["llm"], fix_command(layout.root, ["llm"]))

    stored_dtype = torch.bfloat16 if dtype is None else dtype
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[Task, Path] = {}
    for task in tasks:
        target = merged_model_dir(out_dir, task)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        logger.info("merging the %s adapter into %s", task.value, target)
        _write_merged(layout, task, partial, stored_dtype)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        written[task] = target
    return written


def _write_merged(layout: ModelLayout, task: Task, folder: Path, dtype: torch.dtype) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        layout.base_model_dir, dtype=torch.float32, local_files_only=True, output_loading_info=True
    )
    base, info = cast("tuple[PreTrainedModel, dict[str, Collection[str]]]", loaded)
    _require_exact(layout.base_model_dir, info)
    merged = cast("PreTrainedModel", _load_adapter_strictly(base, layout.adapter_dir(task)).merge_and_unload())
    tokenizer = AutoTokenizer.from_pretrained(layout.adapter_dir(task), local_files_only=True)
    # Upstream generated with pad_token_id set from the adapter's tokenizer (SPEC E.1).
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.to(dtype)  # type: ignore[arg-type]  # mypy misreads the decorator transformers puts on `to`
    merged.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _load_adapter_strictly(base: PreTrainedModel, adapter_dir: Path) -> PeftModelForCausalLM:
    """The base wrapped with the adapter; every adapter tensor must find its place, and back.

    PEFT only warns about missing adapter keys and says nothing about extra ones; a merged model
    built from a partly loaded adapter would silently be a different model. The adapter config's
    `base_model_name_or_path` (a folder on the original author's disk) is never consulted: the
    base comes in as a model.
    """
    from peft import LoraConfig, PeftModelForCausalLM

    config = LoraConfig.from_pretrained(str(adapter_dir))
    model = PeftModelForCausalLM(base, config)
    result = model.load_adapter(str(adapter_dir), adapter_name="default")
    _require_exact(adapter_dir, {"missing_keys": result.missing_keys, "unexpected_keys": result.unexpected_keys})
    return model


def _require_exact(folder: Path, info: Mapping[str, Collection[str]]) -> None:
    problems = {name: sorted(keys) for name, keys in info.items() if name.endswith("_keys") and keys}
    if problems:
        raise CheckpointMismatch(f"the checkpoint in {folder} does not match the model: {problems}")
