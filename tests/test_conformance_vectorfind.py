"""The VectorFind-v7 data layer against the real upstream files and their facts."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.layout import ModelLayout
from models.vectorfind import PROPERTIES, FaceBank


@pytest.fixture(scope="module")
def folder(reference: Path) -> Path:
    return reference / "vectorfind_v7"


@pytest.fixture(scope="module")
def facts(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "vectorfind_v7_facts.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def bank(folder: Path) -> FaceBank:
    return FaceBank.from_dir(folder)


def test_conformance_data_files_are_the_pinned_upstream_bytes(folder: Path, facts: dict[str, Any]) -> None:
    for name, file in facts["files"].items():
        data = (folder / name).read_bytes()
        assert len(data) == file["bytes"], name
        assert hashlib.sha256(data).hexdigest() == file["sha256"], name


def test_conformance_face_numbers_rows_and_groups(bank: FaceBank, facts: dict[str, Any]) -> None:
    assert bank.face_numbers() == tuple(facts["passed_ohlora_nos"])
    for face in facts["faces"]:
        number = face["face_number"]
        assert bank.row(number) == face["csv_row"], number
        assert bank.group(number) == face["group_name"], number


def test_conformance_codes_are_515_numbers_as_float32(bank: FaceBank, facts: dict[str, Any]) -> None:
    layout = facts["ohlora_z_vectors_csv"]
    assert len(bank.face_numbers()) == layout["rows"]
    for number in bank.face_numbers():
        z, label = bank.code(number)
        assert z.dtype == label.dtype == np.float32
        assert z.size + label.size == layout["columns"]
        assert (z.shape, label.shape) == ((512,), (3,))


def test_conformance_change_vectors_are_the_unit_vectors_of_the_files(bank: FaceBank, facts: dict[str, Any]) -> None:
    norms = facts["change_vector_csvs"]["l2_norms"]
    for number in bank.face_numbers():
        vectors = bank.vectors(number)
        group = bank.group(number)
        for prop in PROPERTIES:
            vector = getattr(vectors, prop)
            assert vector.dtype == np.float64 and vector.shape == (512,)
            assert not vector.flags.writeable
            expected = norms[f"{prop}_change_w_vector_{group}.csv"]
            assert math.isclose(float(np.linalg.norm(vector)), expected, rel_tol=1e-12)


def test_conformance_each_group_has_its_own_vectors(bank: FaceBank) -> None:
    first_face_of_group: dict[str, int] = {}
    for number in bank.face_numbers():
        first = first_face_of_group.setdefault(bank.group(number), number)
        assert bank.vectors(number) is bank.vectors(first)
    eyes = [bank.vectors(face).eyes for face in first_face_of_group.values()]
    assert len(eyes) > 1
    assert len({vector.tobytes() for vector in eyes}) == len(eyes)


def test_conformance_from_layout_reads_the_same_data(folder: Path, bank: FaceBank, tmp_path: Path) -> None:
    layout = ModelLayout(tmp_path)
    shutil.copytree(folder, layout.vectorfind_dir)
    from_layout = FaceBank.from_layout(layout)
    assert from_layout.face_numbers() == bank.face_numbers()
    for number in bank.face_numbers():
        assert np.array_equal(from_layout.code(number).z, bank.code(number).z)
        assert np.array_equal(from_layout.vectors(number).pose, bank.vectors(number).pose)


def test_conformance_unknown_face_lists_the_valid_ones(bank: FaceBank, facts: dict[str, Any]) -> None:
    unknown = max(facts["passed_ohlora_nos"]) + 1
    with pytest.raises(ValueError, match=f"unknown face number {unknown}") as error:
        bank.code(unknown)
    assert all(str(number) in str(error.value) for number in facts["passed_ohlora_nos"])
