"""Tiny offline stand-ins for the face side: random weights in the real file formats and layout.

The generator keeps the real architecture and resolution (256 px, every code path including the
fused 128/256 layers) with 16 channels at most, so a frame renders in milliseconds on a CPU; its
GeneratorConfig goes into the checkpoint's sidecar so `load_generator` rebuilds it. Weight scales
are chosen so that images are textured rather than flat or saturated, and so that each unit
change vector moves the image visibly (on the order of 20 of 255 levels per unit weight).
The Property Score CNN has no size knob (its crops are fixed pixel ranges), so it is full size.
Every file is a pure function of the seed: same seed, byte-identical files.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from models.layout import ModelLayout
from models.property_cnn import PropertyScoreCNN
from models.stylegan import Generator, GeneratorConfig, blur_kernel, config_path
from models.vectorfind import LABEL_DIM, PROPERTIES, W_DIM, Z_DIM

TINY_GENERATOR_CONFIG = GeneratorConfig(resolution=256, fmaps_base=1024, fmaps_max=16)
TINY_FACE_COUNT = 8
GROUP_NAMES = tuple("".join(letters) for letters in itertools.product("hl", repeat=3))

# Stored-weight scales of the tiny generator, before the runtime gains of SPEC A.3.
_LAST_MAPPING_SCALE = 0.2  # a short w, so that a unit change vector is a large relative move
_STYLE_WEIGHT_STD = 2.0  # and a steep style affine, so that the move reaches the image
_TO_RGB_WEIGHT_STD = 0.3  # keeps about 95 % of the pixels inside [-1, 1]
_SMALL_STD = 0.2  # synthesis biases and noise strengths
_MAPPING_BIAS_STD = 0.1  # effective, after the lr multiplier


def build_tiny_face_assets(layout: ModelLayout, seed: int = 0) -> None:
    """Write the generator (+ config sidecar), the property CNN and the VectorFind CSVs."""
    weights = torch.Generator().manual_seed(seed)
    _write_bytes(layout.generator_path, _torch_bytes(_generator_state(weights)))
    _write_text(
        config_path(layout.generator_path),
        json.dumps(TINY_GENERATOR_CONFIG.to_dict(), indent=2, sort_keys=True) + "\n",
    )
    _write_bytes(layout.property_cnn_path, _torch_bytes(_property_cnn_state(weights)))
    _write_vectorfind(layout, np.random.default_rng(seed))


def _generator_state(rng: torch.Generator) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        template = Generator(TINY_GENERATOR_CONFIG).state_dict()
    return {name: _generator_tensor(name, tensor.shape, rng).contiguous() for name, tensor in template.items()}


def _generator_tensor(name: str, shape: torch.Size, rng: torch.Generator) -> torch.Tensor:
    def normal(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=rng) * std

    config = TINY_GENERATOR_CONFIG
    leaf = name.rsplit(".", 1)[-1]
    if name in ("synthesis.lod", "truncation.w_avg"):
        return torch.zeros(shape)
    if leaf == "kernel":
        return blur_kernel(shape[0])
    if name.startswith("mapping.dense"):
        if leaf == "bias":
            return normal(_MAPPING_BIAS_STD / config.mapping_lr_mul)
        last = name.startswith(f"mapping.dense{config.mapping_layers - 1}.")
        return normal((_LAST_MAPPING_SCALE if last else 1.0) / config.mapping_lr_mul)
    if name.startswith("synthesis.output"):
        return normal(_TO_RGB_WEIGHT_STD) if leaf == "weight" else torch.zeros(shape)
    if name.endswith("style.weight"):
        return normal(_STYLE_WEIGHT_STD)
    if leaf == "bias" or name.endswith("apply_noise.weight"):
        return normal(_SMALL_STD)
    return normal(1.0)  # label_weight, const, conv weights, noise maps


def _property_cnn_state(rng: torch.Generator) -> dict[str, torch.Tensor]:
    """He-style random weights: signals neither vanish nor saturate through the branches."""
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in PropertyScoreCNN().state_dict().items()}
    state = {}
    for name, shape in shapes.items():
        if name.endswith("bias"):
            state[name] = torch.zeros(shape)
        else:
            fan_in = math.prod(shape[1:])
            state[name] = torch.randn(shape, generator=rng) * math.sqrt(2.0 / fan_in)
    return state


def _write_vectorfind(layout: ModelLayout, rng: np.random.Generator) -> None:
    numbers = sorted(rng.choice(np.arange(100, 2400), size=TINY_FACE_COUNT, replace=False).tolist())
    groups = [GROUP_NAMES[i % len(GROUP_NAMES)] for i in range(TINY_FACE_COUNT)]

    codes = rng.standard_normal((TINY_FACE_COUNT, Z_DIM + LABEL_DIM))
    lines = [",".join(map(str, range(Z_DIM + LABEL_DIM)))]
    lines += [",".join(repr(round(float(value), 4)) for value in code) for code in codes]
    _write_text(layout.z_vectors_csv, "\n".join(lines) + "\n")

    lines = ["case,vector_no,group_name,eyes_corr,mouth_corr,pose_corr"]
    for number, group in zip(numbers, groups, strict=True):
        correlations = [repr(round(float(c), 4)) for c in rng.uniform(-0.97, -0.88, size=3)]
        lines.append(",".join([str(number), "0", group, *correlations]))
    _write_text(layout.group_names_csv, "\n".join(lines) + "\n")

    header = "," + ",".join(map(str, range(W_DIM)))
    for group in GROUP_NAMES:
        for prop in PROPERTIES:
            vector = rng.standard_normal(W_DIM)
            vector = (vector / np.linalg.norm(vector)).astype(np.float32)
            row = "0," + ",".join(str(value) for value in vector)
            _write_text(layout.change_vector_csv(prop, group), f"{header}\n{row}\n")


def _torch_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _write_text(path: Path, text: str) -> None:
    _write_bytes(path, text.encode("utf-8"))


def _write_bytes(path: Path, data: bytes) -> None:
    """Atomic replace: an interrupted build never leaves a half-written file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)
