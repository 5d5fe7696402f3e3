"""Oh-LoRA's face: a face number and three expression weights in, PNG (or eased GIF) bytes out.

Implements `core.types.FaceRenderer` over the StyleGAN-VectorFind-v7 generator along the product
path of SPEC B.3: w = mapping(z, label) once per face, w' = w + e·v_eyes + m·v_mouth + p·v_pose
in float64, synthesis, uint8. An animation renders all its frames in one batched synthesis call.
The renderer keeps a per-face cache of w and is meant to be driven by one inference thread.

`precision` chooses the synthesis path. "exact" is the generator's own module path, float32,
which reproduces the golden fixtures. "float32" and "bfloat16" use `PreparedSynthesis`, which
does the weight work once at load; in bfloat16 a 256 px frame of the real-size generator took
0.12 s instead of 0.36 s on the 2-core AMX Xeon this was written on, with pixels differing from
the exact path by about 1.3 levels on average (random weights; `ohlora bench` reports both).
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Callable, Sequence
from typing import Literal, cast, get_args

import numpy as np
import torch
from PIL import Image

from core.expression import easing_weights, interpolate
from core.types import ExpressionScores, FaceRequest, RenderedFace
from models.device import cpu_has_fast_bfloat16
from models.layout import ModelLayout
from models.stylegan import Generator, PreparedSynthesis, load_generator, to_uint8
from models.vectorfind import LABEL_DIM, W_DIM, Z_DIM, ChangeVectors, FaceBank

logger = logging.getLogger(__name__)

DEFAULT_ANIMATION_FRAMES = 12
DEFAULT_FRAME_MS = 80

Precision = Literal["exact", "float32", "bfloat16"]
_PRECISIONS: tuple[Precision, ...] = get_args(Precision)
_PREPARED_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_precision(setting: str) -> Precision:
    """The synthesis path for a setting; "auto": bfloat16 where the CPU computes it natively, else float32."""
    if setting == "auto":
        return "bfloat16" if cpu_has_fast_bfloat16() else "float32"
    if setting not in _PRECISIONS:
        raise ValueError(f"unknown face precision {setting!r}; choose auto, {', '.join(_PRECISIONS)}")
    return cast(Precision, setting)


class StyleGanFaceRenderer:
    """FaceRenderer over one generator and one FaceBank.

    A request without a face number gets `default_face`, or else a face drawn from `rng`.
    """

    def __init__(
        self,
        generator: Generator,
        bank: FaceBank,
        *,
        rng: random.Random | int | None = None,
        default_face: int | None = None,
        animation_frames: int = DEFAULT_ANIMATION_FRAMES,
        frame_ms: int = DEFAULT_FRAME_MS,
        precision: Precision = "exact",
    ):
        config = generator.config
        if (config.z_dim, config.label_dim, config.w_dim) != (Z_DIM, LABEL_DIM, W_DIM):
            raise ValueError(
                f"generator spaces (z {config.z_dim}, label {config.label_dim}, w {config.w_dim}) "
                f"do not fit the VectorFind data (z {Z_DIM}, label {LABEL_DIM}, w {W_DIM})"
            )
        if animation_frames < 2:
            raise ValueError(f"an animation needs at least 2 frames, got {animation_frames}")
        if default_face is not None:
            bank.require(default_face)
        self._generator = generator
        self._bank = bank
        self._rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        self._default_face = default_face
        self._animation_frames = animation_frames
        self._frame_ms = frame_ms
        self._device = next(generator.parameters()).device
        self._w_cache: dict[int, np.ndarray] = {}
        self._synthesis = _synthesis_for(generator, precision)
        self.precision: Precision = precision

    def faces(self) -> tuple[int, ...]:
        return self._bank.face_numbers()

    def render(self, request: FaceRequest) -> RenderedFace:
        face = self.choose_face(request.face)
        if request.animate and request.previous is not None:
            frames = [interpolate(request.previous, request.scores, t) for t in easing_weights(self._animation_frames)]
            pixels = self.render_pixels(face, frames)
            gif = encode_gif(pixels, self._frame_ms)
            return RenderedFace(data=gif, mime_type="image/gif", face=face)
        pixels = self.render_pixels(face, [request.scores])
        return RenderedFace(data=encode_png(pixels[0]), mime_type="image/png", face=face)

    @torch.inference_mode()
    def render_pixels(self, face: int, frames: Sequence[ExpressionScores]) -> np.ndarray:
        """One synthesis call for all frames → uint8 (F, H, W, 3) RGB."""
        weights = np.array([[s.eyes, s.mouth, s.pose] for s in frames], dtype=np.float64)
        w_edited = apply_expression(self._w(face), self._bank.vectors(face), weights)  # (F, 512)
        wp = self._generator.truncate(torch.from_numpy(w_edited).to(self._device))  # (F, L, 512)
        return to_uint8(self._synthesis(wp))

    def choose_face(self, face: int | None) -> int:
        """The face a request gets: its own number, else the default, else a random draw."""
        if face is None:
            face = self._default_face
        if face is None:
            face = self._rng.choice(self.faces())
            logger.debug("no face requested: drew face %d", face)
        return self._bank.require(face)

    def _w(self, face: int) -> np.ndarray:
        """The face's mapping output as float64 (it depends only on the face, so it is cached)."""
        cached = self._w_cache.get(face)
        if cached is None:
            code = self._bank.code(face)
            z = torch.tensor(code.z, device=self._device).unsqueeze(0)  # (1, 512)
            label = torch.tensor(code.label, device=self._device).unsqueeze(0)  # (1, 3)
            w = self._generator.mapping(z, label).w  # (1, 512) float32
            cached = w[0].cpu().numpy().astype(np.float64)
            self._w_cache[face] = cached
        return cached


def _synthesis_for(generator: Generator, precision: Precision) -> Callable[[torch.Tensor], torch.Tensor]:
    if precision == "exact":
        return generator.synthesis
    if precision not in _PREPARED_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose exact, float32 or bfloat16")
    return PreparedSynthesis(generator.synthesis, _PREPARED_DTYPES[precision])


def apply_expression(w: np.ndarray, vectors: ChangeVectors, weights: np.ndarray) -> np.ndarray:
    """w (512,) and per-frame (eyes, mouth, pose) weights (F, 3) → w' (F, 512) float32.

    SPEC B.3: in float64, adding left to right, with one cast to float32 at the end.
    """
    w64 = np.asarray(w, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1, 3)
    edited = (w64 + weights[:, 0:1] * vectors.eyes) + weights[:, 1:2] * vectors.mouth
    edited = edited + weights[:, 2:3] * vectors.pose
    return edited.astype(np.float32)


def encode_png(pixels: np.ndarray) -> bytes:
    """(H, W, 3) uint8 RGB → PNG bytes; the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_gif(frames: np.ndarray, frame_ms: int) -> bytes:
    """(F, H, W, 3) uint8 RGB → a GIF that plays once and stays on its last frame.

    Each frame gets its own 256-colour palette from the fast octree quantizer: Pillow's default
    (median cut) is a hundred times slower and no better on faces. Pillow merges a frame
    identical to the one before it into one longer frame.
    """
    images = [Image.fromarray(frame).quantize(256, method=Image.Quantize.FASTOCTREE) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms)
    return buffer.getvalue()


def load_face_renderer(
    layout: ModelLayout,
    *,
    seed: int | None = None,
    default_face: int | None = None,
    device: str | torch.device = "cpu",
    animation_frames: int = DEFAULT_ANIMATION_FRAMES,
    precision: Precision = "exact",
) -> StyleGanFaceRenderer:
    """The generator (its sidecar config if it has one, else the real model's) and the FaceBank."""
    bank = FaceBank.from_layout(layout)
    generator = load_generator(layout.generator_path, device=device)
    logger.info(
        "face generator loaded from %s (%d px, %d faces)",
        layout.generator_path,
        generator.config.resolution,
        len(bank.face_numbers()),
    )
    return StyleGanFaceRenderer(
        generator,
        bank,
        rng=random.Random(seed),
        default_face=default_face,
        animation_frames=animation_frames,
        precision=precision,
    )
