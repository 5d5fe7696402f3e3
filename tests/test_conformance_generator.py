"""The generator against the reference: every golden/generator_golden_*.json, and the manifest.

Follows reference/README.md "How tests should use the fixtures": file names, constructor
arguments and tolerances all come from each fixture's JSON, so other fixture sets of the same
format run through the same tests.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from core.types import ExpressionScores
from models.face import StyleGanFaceRenderer, apply_expression
from models.stylegan import Generator, GeneratorConfig, load_generator, to_uint8
from models.vectorfind import ChangeVectors, FaceBank
from tests.conftest import golden_sets


@dataclass(frozen=True)
class GeneratorGolden:
    folder: Path
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]
    config: GeneratorConfig
    generator: Generator

    def file(self, suffix: str) -> Path:
        (name,) = [name for name in self.meta["files"] if name.endswith(suffix)]
        return self.folder / name

    def atol(self, key: str) -> float:
        return float(self.meta["tolerances"][key]["atol"])

    @property
    def cases(self) -> list[dict[str, Any]]:
        return self.meta["cases"]


def config_from(constructor_args: dict[str, Any]) -> GeneratorConfig:
    """Numeric constructor arguments become GeneratorConfig fields; prose entries are notes."""
    numeric = {key: value for key, value in constructor_args.items() if not isinstance(value, str)}
    unknown = set(numeric) - {field.name for field in fields(GeneratorConfig)}
    assert not unknown, f"fixture constructor arguments this config does not know: {unknown}"
    return GeneratorConfig(**numeric)


@pytest.fixture(scope="module", params=golden_sets("generator_golden_*.json"))
def golden(request: pytest.FixtureRequest, reference: Path) -> GeneratorGolden:
    name = request.param
    assert name is not None, f"no golden/generator_golden_*.json in {reference}"
    folder = reference / "golden"
    meta = json.loads((folder / name).read_text(encoding="utf-8"))
    config = config_from(meta["constructor_args"])
    (pth,) = [file for file in meta["files"] if file.endswith(".pth")]
    (npz,) = [file for file in meta["files"] if file.endswith(".npz")]
    with np.load(folder / npz) as data:
        arrays = {key: data[key] for key in data.files}
    generator = load_generator(folder / pth, config)
    return GeneratorGolden(folder, meta, arrays, config, generator)


def assert_close(actual: np.ndarray, expected: np.ndarray, atol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    error = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
    assert error <= atol, f"{what}: max abs error {error:.3g} > {atol:.3g}"


def assert_uint8_conforms(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """README: no value differs by more than 1 and at most 0.1 % of the values differ."""
    assert actual.dtype == np.uint8 and actual.shape == expected.shape, what
    difference = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert difference.max() <= 1, f"{what}: a value differs by {difference.max()}"
    fraction = float(np.mean(difference > 0))
    assert fraction <= 0.001, f"{what}: {fraction:.3%} of the values differ"


def test_golden_fixture_files_match_their_sha256(golden: GeneratorGolden) -> None:
    for name, facts in golden.meta["files"].items():
        data = (golden.folder / name).read_bytes()
        assert len(data) == facts["bytes"], name
        assert hashlib.sha256(data).hexdigest() == facts["sha256"], name


def test_golden_state_dict_keys_and_channels(golden: GeneratorGolden) -> None:
    state = golden.generator.state_dict()
    expected = [(key["name"], key["shape"]) for key in golden.meta["state_dict_keys"]]
    assert [(name, list(tensor.shape)) for name, tensor in state.items()] == expected
    expected_channels = golden.meta["channels_per_resolution"]
    channels = {r: golden.config.channels(int(r)) for r in expected_channels}
    assert channels == expected_channels
    total = sum(parameter.numel() for parameter in golden.generator.parameters())
    assert total == golden.meta["total_parameter_count"]


def test_golden_checkpoint_tensors_are_used_as_stored(golden: GeneratorGolden) -> None:
    """Buffers (noise maps, blur kernels, lod, w_avg) come from the file, not from __init__."""
    stored = torch.load(golden.file(".pth"), map_location="cpu", weights_only=True)
    for name, tensor in golden.generator.state_dict().items():
        assert torch.equal(tensor, stored[name]), name


def test_golden_mapping(golden: GeneratorGolden) -> None:
    a = golden.arrays
    for i in range(len(golden.cases)):
        z, label = torch.from_numpy(a["z"][i : i + 1]), torch.from_numpy(a["label"][i : i + 1])
        with torch.inference_mode():
            out = golden.generator.mapping(z, label)
        for actual, key in (
            (out.label_embedding, "label_embedding"),
            (out.z_normalized, "mapping_z_normalized"),
            (out.w, "w"),
        ):
            assert_close(actual.numpy(), a[key][i : i + 1], golden.atol(key), f"case {i} {key}")


def test_golden_w_modified(golden: GeneratorGolden) -> None:
    a = golden.arrays
    for i in range(len(golden.cases)):
        vectors = ChangeVectors(a["eyes_vector"][i], a["mouth_vector"][i], a["pose_vector"][i])
        w_modified = apply_expression(a["w"][i], vectors, a["scores"][i : i + 1])
        assert w_modified.dtype == np.float32
        expected = a["w_modified"][i : i + 1]
        assert_close(w_modified, expected, golden.atol("w_modified"), f"case {i} w_modified")


def test_golden_synthesis_styles_image_and_uint8(golden: GeneratorGolden) -> None:
    a = golden.arrays
    num_layers = golden.config.num_layers
    for i in range(len(golden.cases)):
        with torch.inference_mode():
            wp = golden.generator.truncate(torch.from_numpy(a["w_modified"][i : i + 1]))
            out = golden.generator.synthesis.forward_with_styles(wp)
        assert wp.shape == (1, num_layers, golden.config.w_dim)
        assert len(out.styles) == num_layers
        for layer, style in enumerate(out.styles):
            key = f"style{layer:02d}"
            expected = a[key][i : i + 1]
            assert_close(style.numpy(), expected, golden.atol("styleNN"), f"case {i} {key}")
        expected = a["image_raw"][i : i + 1]
        assert_close(out.image.numpy(), expected, golden.atol("image_raw"), f"case {i} image_raw")
        expected = a["image_uint8"][i : i + 1]
        assert_uint8_conforms(to_uint8(out.image), expected, f"case {i} image_uint8")


def test_golden_post_processing_of_the_stored_raw_image(golden: GeneratorGolden) -> None:
    """A.7 alone: the fixture's own image_raw must post-process to its image_uint8."""
    a = golden.arrays
    pixels = to_uint8(torch.from_numpy(a["image_raw"]))
    assert_uint8_conforms(pixels, a["image_uint8"], "image_uint8")


def test_golden_unedited_case_equals_full_forward(golden: GeneratorGolden) -> None:
    a = golden.arrays
    unedited = [i for i, case in enumerate(golden.cases) if not np.any(a["scores"][i])]
    for i in unedited:
        z, label = torch.from_numpy(a["z"][i : i + 1]), torch.from_numpy(a["label"][i : i + 1])
        image = golden.generator(z, label)
        expected = a["image_raw"][i : i + 1]
        assert_close(image.numpy(), expected, golden.atol("image_raw"), f"case {i} full forward")


def real_face_cases(golden: GeneratorGolden) -> list[tuple[int, dict[str, Any]]]:
    return [(i, case) for i, case in enumerate(golden.cases) if case["kind"] == "real_face"]


def test_golden_real_faces_come_from_the_face_bank(golden: GeneratorGolden, reference: Path) -> None:
    bank = FaceBank.from_dir(reference / "vectorfind_v7")
    a = golden.arrays
    for i, case in real_face_cases(golden):
        face = case["face_number"]
        assert (bank.row(face), bank.group(face)) == (case["csv_row"], case["group_name"])
        code = bank.code(face)
        assert np.array_equal(code.z, a["z"][i]), face
        assert np.array_equal(code.label, a["label"][i]), face
        assert np.array_equal(np.concatenate([code.z, code.label]), a["code"][i].astype(np.float32))
        vectors = bank.vectors(face)
        for prop in ("eyes", "mouth", "pose"):
            assert np.array_equal(getattr(vectors, prop), a[f"{prop}_vector"][i]), (face, prop)


def test_golden_real_faces_through_the_renderer(golden: GeneratorGolden, reference: Path) -> None:
    """The product path end to end: face number and scores in, the fixture's pixels out."""
    bank = FaceBank.from_dir(reference / "vectorfind_v7")
    renderer = StyleGanFaceRenderer(golden.generator, bank)
    for i, case in real_face_cases(golden):
        scores = ExpressionScores(*map(float, golden.arrays["scores"][i]))
        pixels = renderer.render_pixels(case["face_number"], [scores])
        expected = golden.arrays["image_uint8"][i : i + 1]
        assert_uint8_conforms(pixels, expected, f"case {i} through the renderer")


# --------------------------------------------------------------------------------------------
# Manifest of the real checkpoint


@pytest.fixture(scope="module")
def manifest(reference: Path) -> dict[str, Any]:
    path = reference / "stylegan_v7_generator_state_dict.json"
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def real_size_generator() -> Generator:
    with torch.device("meta"):  # shapes and dtypes only: nothing is allocated or loaded
        return Generator(GeneratorConfig())


def test_manifest_key_order_shapes_dtypes_and_kinds(manifest: dict[str, Any], real_size_generator: Generator) -> None:
    parameters = {name for name, _ in real_size_generator.named_parameters()}
    buffers = {name for name, _ in real_size_generator.named_buffers()}
    actual = [
        (
            name,
            list(tensor.shape),
            str(tensor.dtype).removeprefix("torch."),
            "parameter" if name in parameters else "buffer",
        )
        for name, tensor in real_size_generator.state_dict().items()
    ]
    expected = [(key["name"], key["shape"], key["dtype"], key["kind"]) for key in manifest["keys"]]
    assert actual == expected
    assert parameters | buffers == {key["name"] for key in manifest["keys"]}


def test_manifest_counts(manifest: dict[str, Any], real_size_generator: Generator) -> None:
    counts = manifest["counts"]
    parameters = list(real_size_generator.parameters())
    buffers = list(real_size_generator.buffers())
    assert sum(p.numel() for p in parameters) == counts["total_parameter_count"]
    assert sum(b.numel() for b in buffers) == counts["total_buffer_elements"]
    assert (len(parameters), len(buffers)) == (
        counts["n_parameter_tensors"],
        counts["n_buffer_tensors"],
    )
    assert len(real_size_generator.state_dict()) == counts["n_state_dict_entries"]


def test_manifest_runtime_multipliers(manifest: dict[str, Any], real_size_generator: Generator) -> None:
    """Equalized learning rate (SPEC A.3): each stored tensor's run-time gain."""
    for key in manifest["keys"]:
        if "runtime_multiplier" not in key:
            continue
        module_name, _, leaf = key["name"].rpartition(".")
        module = real_size_generator.get_submodule(module_name)
        gain = getattr(module, f"{leaf}_gain", 1.0)
        assert math.isclose(gain, key["runtime_multiplier"], rel_tol=1e-12), key["name"]


def test_manifest_constructor_defaults(manifest: dict[str, Any]) -> None:
    defaults = manifest["constructor_defaults"]
    config = GeneratorConfig()
    assert (config.z_dim, config.w_dim, config.label_dim) == (
        defaults["z_space_dim"],
        defaults["w_space_dim"],
        defaults["label_size"],
    )
    assert (config.mapping_layers, config.mapping_fmaps, config.mapping_lr_mul) == (
        defaults["mapping_layers"],
        defaults["mapping_fmaps"],
        defaults["mapping_lr_mul"],
    )
    assert (config.fmaps_base, config.fmaps_max, config.init_resolution) == (
        defaults["fmaps_base"],
        defaults["fmaps_max"],
        defaults["init_resolution"],
    )
    assert config.label_embedding_dim == manifest["derived"]["mapping_input_dim"] - config.z_dim
    assert config.num_layers == manifest["derived"]["num_synthesis_layers"]
    for block in manifest["derived"]["per_resolution"]:
        assert config.channels(block["resolution"]) == block["channels"]
