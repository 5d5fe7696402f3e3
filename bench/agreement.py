"""How closely our int8 model follows the float one (bfloat16 where native), on the bench's prompts.

It runs in a process of its own: the bfloat16 reference would otherwise count towards our
side's resident memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from transformers import AutoTokenizer

from core.types import Task
from models.layout import ModelLayout
from models.llm import load_text_generator
from models.quantize import compare_logits, prompt_logits, quantize_base_linears

logger = logging.getLogger(__name__)

AGREEMENT_PROMPTS = 8


def measure_agreement(layout: ModelLayout, replay: Sequence[dict[str, Any]]) -> dict[str, Any]:
    model = load_text_generator(layout, device="cpu").model
    tokenizer = AutoTokenizer.from_pretrained(layout.adapter_dir(Task.OUTPUT_MESSAGE), local_files_only=True)
    requests = [request for turn in replay for request in turn["requests"]][:AGREEMENT_PROMPTS]
    batches = [(r["task"], tokenizer(r["prompt"], return_tensors="pt")["input_ids"]) for r in requests]
    reference = prompt_logits(model, batches)
    quantize_base_linears(model)
    agreement = compare_logits(reference, prompt_logits(model, batches))
    logger.info("int8 agreement: %s", agreement)
    return {"agreement": asdict(agreement)}
