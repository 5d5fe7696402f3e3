"""The VectorFind-v7 data: which faces exist, their latent codes, and their expression vectors.

Reads the upstream CSV files exactly as the product did (SPEC B.1–B.2): data row i of
`ohlora_z_vectors.csv` is face i of `ohlora_w_group_names.csv`; a face's group picks the three
`property_score_vectors/{eyes,mouth,pose}_change_w_vector_{group}.csv` files, of which row 0 is
used. Everything is read and checked once, up front, so that a broken download fails at start-up
with the file's name rather than on some user's message.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from models.errors import ModelFilesMissing
from models.layout import ModelLayout

Z_DIM = 512
LABEL_DIM = 3
W_DIM = 512
PROPERTIES = ("eyes", "mouth", "pose")

# File names inside the upstream folder `stylegan_vectorfind_v7`, for reading a copy of it that
# is not inside a ModelLayout (e.g. the reference folder).
Z_VECTORS_CSV = "ohlora_z_vectors.csv"
GROUP_NAMES_CSV = "ohlora_w_group_names.csv"
PROPERTY_VECTORS_DIR = "property_score_vectors"


class FaceDataError(ValueError):
    """A VectorFind data file is present but malformed."""


class FaceCode(NamedTuple):
    z: np.ndarray  # (512,) float32
    label: np.ndarray  # (3,) float32, the mapping network's extra input (random numbers in v7)


@dataclass(frozen=True, eq=False)
class ChangeVectors:
    """Unit directions in W space, float64 (SPEC B.2); +1 closes eyes/mouth, turns the head less."""

    eyes: np.ndarray  # (512,)
    mouth: np.ndarray
    pose: np.ndarray


@dataclass(frozen=True, eq=False)
class _Face:
    number: int
    row: int
    group: str
    code: FaceCode


class FaceBank:
    """The accepted faces of VectorFind-v7; build it with `from_layout` or `from_dir`.

    Read-only after construction: the arrays it hands out are not writable, so a caller cannot
    edit a face for everyone by accident.
    """

    def __init__(self, faces: Mapping[int, _Face], vectors: Mapping[str, ChangeVectors]):
        self._faces = dict(faces)
        self._vectors = dict(vectors)

    @classmethod
    def from_layout(cls, layout: ModelLayout) -> FaceBank:
        return cls._read(layout.z_vectors_csv, layout.group_names_csv, layout.change_vector_csv)

    @classmethod
    def from_dir(cls, folder: Path) -> FaceBank:
        """A folder laid out like upstream's `stylegan_vectorfind_v7` (e.g. the reference copy)."""
        folder = Path(folder)

        def vector_csv(prop: str, group: str) -> Path:
            return folder / PROPERTY_VECTORS_DIR / f"{prop}_change_w_vector_{group}.csv"

        return cls._read(folder / Z_VECTORS_CSV, folder / GROUP_NAMES_CSV, vector_csv)

    @classmethod
    def _read(
        cls,
        z_vectors_csv: Path,
        group_names_csv: Path,
        change_vector_csv: Callable[[str, str], Path],
    ) -> FaceBank:
        codes = _read_codes(z_vectors_csv)
        groups = _read_groups(group_names_csv)
        if len(codes) != len(groups):
            raise FaceDataError(f"{z_vectors_csv} has {len(codes)} faces but {group_names_csv} has {len(groups)}")
        faces = {
            number: _Face(number=number, row=row, group=group, code=codes[row])
            for row, (number, group) in enumerate(groups)
        }
        vectors = {
            group: ChangeVectors(*(_read_change_vector(change_vector_csv(prop, group)) for prop in PROPERTIES))
            for group in sorted({face.group for face in faces.values()})
        }
        return cls(faces, vectors)

    def face_numbers(self) -> tuple[int, ...]:
        """In file order (upstream's `passed_ohlora_nos`)."""
        return tuple(self._faces)

    def require(self, face: int) -> int:
        """The face number itself, or a ValueError that lists the valid ones."""
        return self._face(face).number

    def row(self, face: int) -> int:
        return self._face(face).row

    def group(self, face: int) -> str:
        return self._face(face).group

    def code(self, face: int) -> FaceCode:
        return self._face(face).code

    def vectors(self, face: int) -> ChangeVectors:
        return self._vectors[self._face(face).group]

    def _face(self, number: int) -> _Face:
        try:
            return self._faces[number]
        except KeyError:
            valid = ", ".join(map(str, self._faces))
            raise ValueError(f"unknown face number {number}; valid faces: {valid}") from None


def _read_rows(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise ModelFilesMissing([path])
    with path.open(newline="", encoding="utf-8") as file:
        rows = [row for row in csv.reader(file) if row]
    if len(rows) < 2:
        raise FaceDataError(f"{path}: expected a header line and at least one data row")
    return rows


def _floats(path: Path, line: int, fields: list[str]) -> np.ndarray:
    try:
        values = np.array([float(field) for field in fields], dtype=np.float64)
    except ValueError as error:
        raise FaceDataError(f"{path}, line {line}: {error}") from None
    if not np.all(np.isfinite(values)):
        raise FaceDataError(f"{path}, line {line}: non-finite value")
    return values


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _read_codes(path: Path) -> list[FaceCode]:
    """One header line, then per face 515 numbers: z (512) and label (3); float64 → float32."""
    header, *rows = _read_rows(path)
    width = Z_DIM + LABEL_DIM
    if len(header) != width:
        raise FaceDataError(f"{path}: header has {len(header)} columns, expected {width}")
    codes = []
    for line, row in enumerate(rows, start=2):
        if len(row) != width:
            raise FaceDataError(f"{path}, line {line}: {len(row)} values, expected {width}")
        code = _floats(path, line, row).astype(np.float32)
        codes.append(FaceCode(z=_frozen(code[:Z_DIM]), label=_frozen(code[Z_DIM:])))
    return codes


def _read_groups(path: Path) -> list[tuple[int, str]]:
    """(face number, group name) per row, from the `case` and `group_name` columns."""
    header, *rows = _read_rows(path)
    try:
        case_column, group_column = header.index("case"), header.index("group_name")
    except ValueError:
        raise FaceDataError(f"{path}: needs columns case and group_name, got {header}") from None
    groups: list[tuple[int, str]] = []
    seen: set[int] = set()
    for line, row in enumerate(rows, start=2):
        try:
            number, group = int(row[case_column]), row[group_column].strip()
        except (IndexError, ValueError):
            raise FaceDataError(f"{path}, line {line}: bad case/group_name in {row}") from None
        if not group:
            raise FaceDataError(f"{path}, line {line}: empty group_name")
        if number in seen:
            raise FaceDataError(f"{path}, line {line}: face {number} listed twice")
        seen.add(number)
        groups.append((number, group))
    return groups


def _read_change_vector(path: Path) -> np.ndarray:
    """Header ",0,...,511", then row 0: its index, then 512 floats (float64)."""
    header, first, *_ = _read_rows(path)
    if len(header) != W_DIM + 1 or len(first) != W_DIM + 1:
        raise FaceDataError(f"{path}: expected an index column and {W_DIM} values")
    if first[0].strip() != "0":
        raise FaceDataError(f"{path}: the first data row should be row 0, got {first[0]!r}")
    vector = _floats(path, 2, first[1:])
    if not math.isclose(float(np.linalg.norm(vector)), 1.0, abs_tol=1e-3):
        raise FaceDataError(f"{path}: expected a unit vector, norm is {np.linalg.norm(vector)}")
    return _frozen(vector)
