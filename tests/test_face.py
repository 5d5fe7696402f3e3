"""The face renderer and its loaders, on the tiny stand-in assets (no reference folder needed)."""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.types import IDLE_SCORES, ExpressionScores, FaceRenderer, FaceRequest
from models.face import StyleGanFaceRenderer, load_face_renderer
from models.layout import ModelLayout
from models.property_cnn import load_property_cnn, measure
from models.stylegan import (
    CheckpointError,
    GeneratorConfig,
    Truncation,
    config_path,
    load_generator,
    to_uint8,
)
from models.tiny_face import TINY_GENERATOR_CONFIG, build_tiny_face_assets
from models.vectorfind import FaceBank, FaceDataError

ANSWER = ExpressionScores(eyes=-1.1, mouth=-1.4, pose=-0.9)


@pytest.fixture(scope="session")
def tiny_layout(tmp_path_factory: pytest.TempPathFactory) -> ModelLayout:
    layout = ModelLayout(tmp_path_factory.mktemp("tiny_face"))
    build_tiny_face_assets(layout, seed=0)
    return layout


@pytest.fixture(scope="session")
def renderer(tiny_layout: ModelLayout) -> StyleGanFaceRenderer:
    return load_face_renderer(tiny_layout, seed=0)


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def mean_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))))


# --------------------------------------------------------------------------------------------
# Tiny assets


def test_tiny_build_is_deterministic_and_idempotent(tiny_layout: ModelLayout, tmp_path: Path) -> None:
    expected = file_digests(tiny_layout.root)
    assert len(expected) == 2 + 1 + 2 + 24  # generator + config, CNN, two CSVs, 24 vectors

    again = ModelLayout(tmp_path / "again")
    build_tiny_face_assets(again, seed=0)
    assert file_digests(again.root) == expected
    build_tiny_face_assets(again, seed=0)
    assert file_digests(again.root) == expected

    other = ModelLayout(tmp_path / "other")
    build_tiny_face_assets(other, seed=1)
    generator_file = str(tiny_layout.generator_path.relative_to(tiny_layout.root))
    assert file_digests(other.root)[generator_file] != expected[generator_file]


def test_tiny_generator_config_travels_in_its_sidecar(tiny_layout: ModelLayout) -> None:
    recorded = json.loads(config_path(tiny_layout.generator_path).read_text(encoding="utf-8"))
    assert GeneratorConfig.from_dict(recorded) == TINY_GENERATOR_CONFIG
    generator = load_generator(tiny_layout.generator_path)
    assert generator.config == TINY_GENERATOR_CONFIG
    assert not generator.training
    assert not any(parameter.requires_grad for parameter in generator.parameters())


def test_tiny_csvs_use_the_upstream_formats(tiny_layout: ModelLayout) -> None:
    header, first_row = tiny_layout.z_vectors_csv.read_text().splitlines()[:2]
    assert header.split(",") == [str(i) for i in range(515)]
    assert all(len(value.split(".")[-1]) <= 4 for value in first_row.split(","))
    groups_header = tiny_layout.group_names_csv.read_text().splitlines()[0]
    assert groups_header == "case,vector_no,group_name,eyes_corr,mouth_corr,pose_corr"
    bank = FaceBank.from_layout(tiny_layout)
    for face in bank.face_numbers():
        for vector in (bank.vectors(face).eyes, bank.vectors(face).mouth, bank.vectors(face).pose):
            assert abs(np.linalg.norm(vector) - 1.0) < 1e-6


def test_tiny_faces_are_textured_not_flat_or_saturated(renderer: StyleGanFaceRenderer) -> None:
    pixels = renderer.render_pixels(renderer.faces()[0], [IDLE_SCORES])[0]
    assert pixels.shape == (256, 256, 3)
    assert pixels.std() > 20
    assert np.mean((pixels == 0) | (pixels == 255)) < 0.15


def test_tiny_property_cnn_measures_a_rendered_face(tiny_layout: ModelLayout, renderer: StyleGanFaceRenderer) -> None:
    cnn = load_property_cnn(tiny_layout.property_cnn_path)
    scores = measure(cnn, renderer.render_pixels(renderer.faces()[0], [IDLE_SCORES])[0])
    assert all(np.isfinite(value) for value in vars(scores).values())


# --------------------------------------------------------------------------------------------
# Rendering


def test_render_is_deterministic(tiny_layout: ModelLayout, renderer: StyleGanFaceRenderer) -> None:
    as_protocol: FaceRenderer = renderer  # mypy checks the protocol
    request = FaceRequest(face=as_protocol.faces()[1], scores=ANSWER)
    first = as_protocol.render(request)
    assert first.mime_type == "image/png" and first.face == request.face
    assert renderer.render(request).data == first.data
    assert load_face_renderer(tiny_layout).render(request).data == first.data


def test_png_holds_the_unedited_face_of_the_plain_generator(
    renderer: StyleGanFaceRenderer, tiny_layout: ModelLayout
) -> None:
    """With zero weights the product path is the generator's own full forward (SPEC B.3)."""
    face = renderer.faces()[2]
    png = renderer.render(FaceRequest(face=face, scores=ExpressionScores(0.0, 0.0, 0.0)))
    z, label = FaceBank.from_layout(tiny_layout).code(face)
    generator = load_generator(tiny_layout.generator_path)
    expected = to_uint8(generator(torch.tensor(z)[None], torch.tensor(label)[None]))[0]
    assert np.array_equal(decode(png.data), expected)


@pytest.mark.parametrize("prop", ["eyes", "mouth", "pose"])
def test_each_score_moves_the_image_along_its_own_vector(
    renderer: StyleGanFaceRenderer, tiny_layout: ModelLayout, prop: str
) -> None:
    face = renderer.faces()[0]
    moved = ExpressionScores(**{**vars(IDLE_SCORES), prop: getattr(IDLE_SCORES, prop) + 1.0})
    base, shifted = renderer.render_pixels(face, [IDLE_SCORES, moved])
    assert mean_abs_difference(base, shifted) > 5.0

    # The move is w + 1.0·v_prop, with the face's own group vector.
    bank = FaceBank.from_layout(tiny_layout)
    generator = load_generator(tiny_layout.generator_path)
    z, label = (torch.tensor(part)[None] for part in bank.code(face))
    with torch.inference_mode():
        w = generator.mapping(z, label).w.double()
        for name in ("eyes", "mouth", "pose"):
            vector = torch.tensor(getattr(bank.vectors(face), name))
            w = w + getattr(moved, name) * vector
        expected = to_uint8(generator.synthesis(generator.truncate(w.float())))[0]
    assert np.abs(shifted.astype(np.int16) - expected).max() <= 1


def test_w_is_mapped_once_per_face(tiny_layout: ModelLayout) -> None:
    generator = load_generator(tiny_layout.generator_path)
    renderer = StyleGanFaceRenderer(generator, FaceBank.from_layout(tiny_layout))
    calls: list[int] = []
    generator.mapping.register_forward_hook(lambda *_: calls.append(1))
    first, second = renderer.faces()[:2]
    for scores in (IDLE_SCORES, ANSWER, IDLE_SCORES):
        renderer.render(FaceRequest(face=first, scores=scores))
    renderer.render(FaceRequest(face=first, scores=ANSWER, previous=IDLE_SCORES, animate=True))
    assert len(calls) == 1
    renderer.render(FaceRequest(face=second, scores=ANSWER))
    assert len(calls) == 2


@pytest.mark.parametrize("frames", [2, 5])
def test_animation_is_a_gif_with_the_requested_frames(tiny_layout: ModelLayout, frames: int) -> None:
    renderer = load_face_renderer(tiny_layout, animation_frames=frames)
    face = renderer.faces()[0]
    request = FaceRequest(face=face, scores=ANSWER, previous=IDLE_SCORES, animate=True)
    gif = renderer.render(request)
    assert gif.mime_type == "image/gif" and gif.filename.endswith(".gif")
    with Image.open(io.BytesIO(gif.data)) as image:
        assert image.n_frames == frames
        image.seek(frames - 1)
        last = np.asarray(image.convert("RGB"))
    start, target = renderer.render_pixels(face, [IDLE_SCORES, ANSWER])
    # The animation ends on the answer's face (up to the GIF palette), not the previous one.
    assert mean_abs_difference(last, target) < mean_abs_difference(last, start) / 2
    assert renderer.render(request).data == gif.data


def test_animate_without_previous_scores_is_a_still_png(renderer: StyleGanFaceRenderer) -> None:
    face = renderer.faces()[0]
    still = renderer.render(FaceRequest(face=face, scores=ANSWER, animate=True))
    assert still.mime_type == "image/png"
    assert still.data == renderer.render(FaceRequest(face=face, scores=ANSWER)).data


# --------------------------------------------------------------------------------------------
# Face choice


def test_unknown_face_number_is_refused_with_the_valid_ones(
    renderer: StyleGanFaceRenderer, tiny_layout: ModelLayout
) -> None:
    unknown = max(renderer.faces()) + 1
    with pytest.raises(ValueError, match=f"unknown face number {unknown}") as error:
        renderer.render(FaceRequest(face=unknown, scores=IDLE_SCORES))
    assert all(str(face) in str(error.value) for face in renderer.faces())
    with pytest.raises(ValueError, match="valid faces"):
        load_face_renderer(tiny_layout, default_face=unknown)


def test_no_face_number_means_the_default_or_a_seeded_random_one(
    tiny_layout: ModelLayout,
) -> None:
    generator = load_generator(tiny_layout.generator_path)
    bank = FaceBank.from_layout(tiny_layout)
    faces = bank.face_numbers()
    pinned = StyleGanFaceRenderer(generator, bank, default_face=faces[3])
    assert pinned.render(FaceRequest(face=None, scores=IDLE_SCORES)).face == faces[3]
    assert pinned.choose_face(faces[1]) == faces[1]

    def drawn(seed: int) -> list[int]:
        seeded = StyleGanFaceRenderer(generator, bank, rng=random.Random(seed))
        return [seeded.choose_face(None) for _ in range(20)]

    assert drawn(7) == drawn(7)
    assert set(drawn(7)) <= set(faces) and len(set(drawn(7))) > 1
    seeded = StyleGanFaceRenderer(generator, bank, rng=random.Random(7))
    assert seeded.render(FaceRequest(face=None, scores=IDLE_SCORES)).face == drawn(7)[0]


# --------------------------------------------------------------------------------------------
# Broken files


def copy_without_cnn(layout: ModelLayout, destination: Path) -> ModelLayout:
    """The renderer's files only (the 46 MB CNN is not needed to render)."""
    shutil.copytree(layout.root, destination, ignore=shutil.ignore_patterns(layout.property_cnn_path.name))
    return ModelLayout(destination)


@pytest.mark.parametrize(
    "missing",
    [
        lambda layout: layout.generator_path,
        lambda layout: layout.z_vectors_csv,
        lambda layout: layout.group_names_csv,
        lambda layout: layout.change_vector_csv("mouth", "lhl"),
    ],
    ids=["generator", "z_vectors", "group_names", "change_vector"],
)
def test_a_missing_file_is_named(
    tiny_layout: ModelLayout, tmp_path: Path, missing: Callable[[ModelLayout], Path]
) -> None:
    layout = copy_without_cnn(tiny_layout, tmp_path / "models")
    path = missing(layout)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=str(path)):
        load_face_renderer(layout)


def test_corrupt_csvs_are_named(tiny_layout: ModelLayout, tmp_path: Path) -> None:
    layout = copy_without_cnn(tiny_layout, tmp_path / "models")
    lines = layout.z_vectors_csv.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0]  # face 2 loses its last number
    layout.z_vectors_csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(FaceDataError, match=f"{layout.z_vectors_csv}, line 3: 514 values"):
        FaceBank.from_layout(layout)

    layout = copy_without_cnn(tiny_layout, tmp_path / "models2")
    vector_csv = layout.change_vector_csv("pose", "hhh")
    header, row = vector_csv.read_text().splitlines()
    vector_csv.write_text(f"{header}\n{row.replace(',', ',x', 1)}\n")
    with pytest.raises(FaceDataError, match=str(vector_csv)):
        FaceBank.from_layout(layout)


def test_a_checkpoint_that_does_not_fit_is_named(tiny_layout: ModelLayout, tmp_path: Path) -> None:
    state = torch.load(tiny_layout.generator_path, weights_only=True)
    extra = tmp_path / "extra.pth"
    torch.save({**state, "synthesis.layer99.bias": torch.zeros(3)}, extra)
    with pytest.raises(CheckpointError, match="layer99") as error:
        load_generator(extra, TINY_GENERATOR_CONFIG)
    assert str(extra) in str(error.value)

    lacking = tmp_path / "lacking.pth"
    torch.save({k: v for k, v in state.items() if k != "truncation.w_avg"}, lacking)
    with pytest.raises(CheckpointError, match=r"truncation\.w_avg"):
        load_generator(lacking, TINY_GENERATOR_CONFIG)

    # The real-size architecture does not accept the tiny weights.
    with pytest.raises(CheckpointError, match="size mismatch"):
        load_generator(tiny_layout.generator_path, GeneratorConfig())


# --------------------------------------------------------------------------------------------
# Generator details that no fixture reaches


def test_post_processing_rounds_half_up_and_saturates() -> None:
    # (v + 1)·255/2: 0 → 127.5 → 128 (not truncated to 127), -0.5 → 63.75 → 64,
    # 0.5 → 191.25 → 191; values outside [-1, 1] saturate.
    raw = torch.tensor([0.0, -0.5, 0.5, -1.0, 1.0, 3.0, -2.0])
    pixels = to_uint8(raw.view(1, 1, 1, -1).expand(1, 3, 1, -1))
    assert pixels.shape == (1, 1, 7, 3) and pixels.dtype == np.uint8
    assert pixels[0, 0, :, 0].tolist() == [128, 64, 191, 0, 255, 255, 0]


def test_a_generator_that_is_not_fully_grown_is_refused(tiny_layout: ModelLayout) -> None:
    generator = load_generator(tiny_layout.generator_path)
    generator.synthesis.lod.fill_(1.0)
    wp = torch.zeros(1, generator.config.num_layers, generator.config.w_dim)
    with pytest.raises(ValueError, match="lod"):
        generator.synthesis(wp)


def test_truncation_pulls_only_the_first_layers_toward_w_avg() -> None:
    truncation = Truncation(num_layers=4, w_dim=512)
    truncation.w_avg.fill_(1.0)
    w = torch.full((1, 512), 3.0)
    assert torch.equal(truncation(w), w[:, None].repeat(1, 4, 1))  # psi 1: the product's case
    wp = truncation(w, psi=0.5, layers=2)
    assert torch.equal(wp[:, :2], torch.full((1, 2, 512), 2.0))
    assert torch.equal(wp[:, 2:], torch.full((1, 2, 512), 3.0))
