"""The Property Score CNN against the reference: every golden/property_cnn_golden_*.json, and the
manifest of the real checkpoint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.property_cnn import (
    BRANCHES,
    PropertyScoreCNN,
    PropertyScores,
    load_property_cnn,
    measure,
    preprocess,
)
from tests.conftest import golden_sets


@dataclass(frozen=True)
class CnnGolden:
    folder: Path
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]
    cnn: PropertyScoreCNN

    def atol(self, key: str) -> float:
        return float(self.meta["tolerances"][key]["atol"])


@pytest.fixture(scope="module", params=golden_sets("property_cnn_golden_*.json"))
def golden(request: pytest.FixtureRequest, reference: Path) -> CnnGolden:
    name = request.param
    assert name is not None, f"no golden/property_cnn_golden_*.json in {reference}"
    folder = reference / "golden"
    meta = json.loads((folder / name).read_text(encoding="utf-8"))
    (pth,) = [file for file in meta["files"] if file.endswith(".pth")]
    (npz,) = [file for file in meta["files"] if file.endswith(".npz")]
    with np.load(folder / npz) as data:
        arrays = {key: data[key] for key in data.files}
    return CnnGolden(folder, meta, arrays, load_property_cnn(folder / pth))


def test_golden_cnn_fixture_files_match_their_sha256(golden: CnnGolden) -> None:
    for name, facts in golden.meta["files"].items():
        data = (golden.folder / name).read_bytes()
        assert len(data) == facts["bytes"], name
        assert hashlib.sha256(data).hexdigest() == facts["sha256"], name


def test_golden_cnn_loads_float16_into_float32_exactly(golden: CnnGolden) -> None:
    (pth,) = [file for file in golden.meta["files"] if file.endswith(".pth")]
    stored = torch.load(golden.folder / pth, map_location="cpu", weights_only=True)
    for name, tensor in golden.cnn.state_dict().items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, stored[name].float()), name
    assert not golden.cnn.training


def test_golden_cnn_inputs(golden: CnnGolden) -> None:
    inputs = preprocess(golden.arrays["images_uint8"])
    expected = golden.arrays["inputs"]
    assert inputs.dtype == torch.float32 and tuple(inputs.shape) == expected.shape
    assert np.max(np.abs(inputs.numpy() - expected)) <= golden.atol("inputs")


def test_golden_cnn_outputs_per_image(golden: CnnGolden) -> None:
    columns = golden.meta["output_columns"]
    assert columns == [field.name for field in fields(PropertyScores)]
    for i, image in enumerate(golden.arrays["images_uint8"]):
        scores = measure(golden.cnn, image)
        actual = np.array([getattr(scores, column) for column in columns])
        error = np.max(np.abs(actual - golden.arrays["outputs"][i]))
        assert error <= golden.atol("outputs"), f"image {i}: max abs error {error:.3g}"


def test_golden_cnn_scores_in_eval_mode_even_when_given_a_training_model(
    golden: CnnGolden,
) -> None:
    """Upstream scored with dropout on (SPEC F.7); the fixtures, and we, score in eval mode."""
    image = golden.arrays["images_uint8"][0]
    golden.cnn.train()
    try:
        scores = measure(golden.cnn, image)
    finally:
        golden.cnn.eval()
    actual = np.array([getattr(scores, field.name) for field in fields(PropertyScores)])
    assert np.max(np.abs(actual - golden.arrays["outputs"][0])) <= golden.atol("outputs")


def test_cnn_rejects_images_that_are_not_256_square() -> None:
    with torch.device("meta"):
        cnn = PropertyScoreCNN()
    with pytest.raises(ValueError, match="256"):
        measure(cnn, np.zeros((128, 128, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((256, 256, 3), dtype=np.float32))


# --------------------------------------------------------------------------------------------
# Manifest of the real checkpoint


@pytest.fixture(scope="module")
def manifest(reference: Path) -> dict[str, Any]:
    path = reference / "property_cnn_state_dict.json"
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cnn_on_meta() -> PropertyScoreCNN:
    with torch.device("meta"):  # shapes and dtypes only
        return PropertyScoreCNN()


def test_manifest_cnn_keys_shapes_dtypes_and_kinds(manifest: dict[str, Any], cnn_on_meta: PropertyScoreCNN) -> None:
    parameters = {name for name, _ in cnn_on_meta.named_parameters()}
    actual = [
        (
            name,
            list(tensor.shape),
            str(tensor.dtype).removeprefix("torch."),
            "parameter" if name in parameters else "buffer",
        )
        for name, tensor in cnn_on_meta.state_dict().items()
    ]
    assert actual == [(k["name"], k["shape"], k["dtype"], k["kind"]) for k in manifest["keys"]]
    assert list(cnn_on_meta.buffers()) == []
    counts = manifest["counts"]
    assert sum(p.numel() for p in cnn_on_meta.parameters()) == counts["total_parameter_count"]
    assert len(actual) == counts["n_state_dict_entries"]


def test_manifest_cnn_branches_crops_and_flatten_sizes(manifest: dict[str, Any], cnn_on_meta: PropertyScoreCNN) -> None:
    by_submodule = {branch["submodule"]: branch for branch in manifest["branches"].values()}
    assert set(by_submodule) == {spec.name for spec in BRANCHES}
    for spec in BRANCHES:
        branch = by_submodule[spec.name]
        assert list(spec.rows) == branch["crop_rows_half_open"], spec.name
        assert list(spec.cols) == branch["crop_cols_half_open"], spec.name
        module = cnn_on_meta.get_submodule(spec.name)
        assert module.flatten_size == branch["flatten_size"], spec.name
        assert module.stage_names == branch["stages"], spec.name


def test_manifest_cnn_output_order(manifest: dict[str, Any]) -> None:
    """Output i of the model is the i-th PropertyScores field (manifest index_to_property)."""
    index_to_property = manifest["outputs"]["index_to_property"]
    names = [field.name for field in fields(PropertyScores)]
    for index, description in index_to_property.items():
        assert description.split()[0] == names[int(index)]
