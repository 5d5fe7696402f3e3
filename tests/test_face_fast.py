"""The prepared synthesis path (`PreparedSynthesis`) and the renderer's precision choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.types import IDLE_SCORES, ExpressionScores, FaceRequest
from models.device import cpu_has_fast_bfloat16
from models.face import StyleGanFaceRenderer, load_face_renderer, resolve_precision
from models.layout import ModelLayout
from models.stylegan import Generator, GeneratorConfig, PreparedSynthesis, load_generator, to_uint8
from models.tiny_face import build_tiny_face_assets
from models.vectorfind import FaceBank
from tests.test_conformance_generator import assert_uint8_conforms, config_from

ANSWER = ExpressionScores(eyes=-1.1, mouth=-1.4, pose=-0.9)


@pytest.fixture(scope="module")
def tiny_layout(tmp_path_factory: pytest.TempPathFactory) -> ModelLayout:
    layout = ModelLayout(tmp_path_factory.mktemp("tiny_face_fast"))
    build_tiny_face_assets(layout, seed=3)
    return layout


@pytest.fixture(scope="module")
def generator(tiny_layout: ModelLayout) -> Generator:
    return load_generator(tiny_layout.generator_path)


def styles(generator: Generator, frames: int, seed: int = 0) -> torch.Tensor:
    """wp (frames, L, 512) from random codes through the real mapping."""
    codes = torch.Generator().manual_seed(seed)
    z = torch.randn(frames, 512, generator=codes)
    label = torch.randn(frames, 3, generator=codes)
    with torch.inference_mode():
        return generator.truncate(generator.mapping(z, label).w)


def test_float32_prepared_path_equals_the_module_path(generator: Generator) -> None:
    wp = styles(generator, 3)
    with torch.inference_mode():
        expected = generator.synthesis(wp)
    actual = PreparedSynthesis(generator.synthesis, torch.float32)(wp)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert actual.is_contiguous()
    assert torch.allclose(actual, expected, atol=1e-4, rtol=0)


def test_bfloat16_prepared_path_stays_close(generator: Generator) -> None:
    wp = styles(generator, 2, seed=1)
    with torch.inference_mode():
        exact = to_uint8(generator.synthesis(wp)).astype(np.int16)
    fast = to_uint8(PreparedSynthesis(generator.synthesis, torch.bfloat16)(wp)).astype(np.int16)
    difference = np.abs(fast - exact)
    assert difference.mean() < 4.0
    # Close is not identical: the rounding is real, and the test would notice if it vanished.
    assert difference.max() > 0


def test_frames_are_independent_of_their_batch(generator: Generator) -> None:
    prepared = PreparedSynthesis(generator.synthesis, torch.float32)
    wp = styles(generator, 3, seed=2)
    together = prepared(wp)
    for i in range(3):
        assert torch.equal(prepared(wp[i : i + 1])[0], together[i])


def test_a_generator_that_is_not_fully_grown_is_refused(tiny_layout: ModelLayout) -> None:
    generator = load_generator(tiny_layout.generator_path)
    generator.synthesis.lod.fill_(0.5)
    with pytest.raises(ValueError, match="lod"):
        PreparedSynthesis(generator.synthesis)


def test_preparing_leaves_the_generator_unchanged(generator: Generator) -> None:
    before = {name: tensor.clone() for name, tensor in generator.state_dict().items()}
    PreparedSynthesis(generator.synthesis, torch.bfloat16)
    after = generator.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_renderer_precision_choice(tiny_layout: ModelLayout, generator: Generator) -> None:
    bank = FaceBank.from_layout(tiny_layout)
    face = bank.face_numbers()[0]
    exact = StyleGanFaceRenderer(generator, bank)
    prepared = load_face_renderer(tiny_layout, precision="float32")
    exact_pixels = exact.render_pixels(face, [IDLE_SCORES, ANSWER]).astype(np.int16)
    prepared_pixels = prepared.render_pixels(face, [IDLE_SCORES, ANSWER]).astype(np.int16)
    assert np.abs(exact_pixels - prepared_pixels).max() <= 1
    request = FaceRequest(face=face, scores=ANSWER)
    assert prepared.render(request).mime_type == "image/png"
    with pytest.raises(ValueError, match="precision"):
        StyleGanFaceRenderer(generator, bank, precision="float16")  # type: ignore[arg-type]


def test_float32_prepared_path_conforms_to_the_golden_fixtures(reference: Path) -> None:
    """The reference tolerances hold for the prepared float32 path too (README, Generator)."""
    jsons = sorted((reference / "golden").glob("generator_golden_*.json"))
    assert jsons, f"no golden generator fixtures in {reference}"
    for meta_path in jsons:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        (pth,) = [name for name in meta["files"] if name.endswith(".pth")]
        (npz,) = [name for name in meta["files"] if name.endswith(".npz")]
        generator = load_generator(meta_path.parent / pth, config_from(meta["constructor_args"]))
        prepared = PreparedSynthesis(generator.synthesis, torch.float32)
        atol = float(meta["tolerances"]["image_raw"]["atol"])
        with np.load(meta_path.parent / npz) as arrays:
            for i in range(len(arrays["w_modified"])):
                wp = generator.truncate(torch.from_numpy(arrays["w_modified"][i : i + 1]))
                raw = prepared(wp)
                assert np.abs(raw.numpy() - arrays["image_raw"][i : i + 1]).max() <= atol
                assert_uint8_conforms(to_uint8(raw), arrays["image_uint8"][i : i + 1], f"{meta_path.name} case {i}")


def test_real_size_generator_prepares() -> None:
    """The real widths (512 channels, fused 128/256 layers at 128 and 64 channels) agree too."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        generator = Generator(GeneratorConfig()).requires_grad_(False).eval()
        with torch.no_grad():
            for name, parameter in generator.named_parameters():
                if name.startswith("synthesis.") and name.endswith(("bias", "apply_noise.weight")):
                    parameter.normal_(0.0, 0.2)
        wp = styles(generator, 1)
    with torch.inference_mode():
        expected = generator.synthesis(wp)
    actual = PreparedSynthesis(generator.synthesis, torch.float32)(wp)
    assert torch.allclose(actual, expected, atol=1e-3 * float(expected.abs().max()), rtol=0)


def test_the_precision_setting() -> None:
    assert resolve_precision("auto") == ("bfloat16" if cpu_has_fast_bfloat16() else "float32")
    assert [resolve_precision(name) for name in ("exact", "float32", "bfloat16")] == ["exact", "float32", "bfloat16"]
    with pytest.raises(ValueError, match="unknown face precision 'float16'"):
        resolve_precision("float16")
