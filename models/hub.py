"""Fetch the published checkpoints and data into the on-disk layout, and check that layout.

The real profile needs files from two places: Hugging Face repositories (the Polyglot-Ko base,
the four LoRA adapters, the S-BERT and the StyleGAN checkpoints) and one pinned commit of a
GitHub repository (the VectorFind-v7 CSVs, which exist in several incompatible versions upstream,
hence the pinned commit and the sha256 of every file). Everything lands where `ModelLayout` says,
which is the original project's own layout, so a user who already has the files just points
`--models-dir` at them.

Downloading is idempotent: whatever is already complete is never fetched again, so a second run
makes no network call at all. A hub repository is fetched into a staging folder inside the
models folder and its files are moved into place only once the expected files are all there; an
interrupted run leaves the staging folder behind and the next run resumes it. The network comes
in through two narrow seams (`HubClient` and an `httpx.Client`) so tests never touch it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential
from tqdm.auto import tqdm

from core.types import Task
from models.errors import ModelFilesMissing
from models.layout import TASKS, ModelLayout

logger = logging.getLogger(__name__)

Part = Literal["llm", "sbert", "stylegan", "vectorfind"]
PARTS: tuple[Part, ...] = ("llm", "sbert", "stylegan", "vectorfind")

MODELS_DIR_ENV = "OHLORA_MODELS_DIR"
DEFAULT_MODELS_DIR = Path("data/models")
STAGING_DIR_NAME = ".download"

BASE_MODEL_REPO = "EleutherAI/polyglot-ko-1.3b"
SBERT_REPO = "daebakgazua/250502_OhLoRA_LLM_SBERT"
STYLEGAN_REPO = "daebakgazua/250502_OhLoRA_StyleGAN_FineTuned"


def adapter_repo(task: Task) -> str:
    return f"daebakgazua/250502_OhLoRA_LLM_{task.value}"


# ---------------------------------------------------------------------------------------------
# What a complete folder holds
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequiredFile:
    """One required file, also accepted under its `alternatives` (errors name `name`).

    A name ending in ".index.json" is a sharded checkpoint's index: every shard it lists must be
    there too.
    """

    name: str
    alternatives: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.alternatives)


_CAUSAL_LM_WEIGHTS = RequiredFile(
    "model.safetensors",
    alternatives=("model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"),
)
BASE_MODEL_FILES = (RequiredFile("config.json"), _CAUSAL_LM_WEIGHTS)
ADAPTER_FILES = (
    RequiredFile("adapter_config.json"),
    RequiredFile("adapter_model.safetensors", alternatives=("adapter_model.bin",)),
    RequiredFile("tokenizer.json"),
    RequiredFile("tokenizer_config.json"),
)
SBERT_FILES = (
    RequiredFile("config.json"),
    RequiredFile("model.safetensors", alternatives=("pytorch_model.bin",)),
    RequiredFile("tokenizer.json", alternatives=("vocab.txt",)),
)


def _is_nonempty_file(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _missing_shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        return [index]
    return [index.parent / shard for shard in shards if not _is_nonempty_file(index.parent / shard)]


def missing_files(folder: Path, required: Sequence[RequiredFile]) -> list[Path]:
    """The required files absent (or empty) in `folder`; empty when the folder is complete."""
    missing: list[Path] = []
    for need in required:
        found = next((folder / name for name in need.names if _is_nonempty_file(folder / name)), None)
        if found is None:
            missing.append(folder / need.name)
        elif found.name.endswith(".index.json"):
            missing.extend(_missing_shards(found))
    return missing


# ---------------------------------------------------------------------------------------------
# Where each file comes from
# ---------------------------------------------------------------------------------------------


def _is_hidden(path: Path, below: Path) -> bool:
    """Dot-entries (huggingface_hub's .cache bookkeeping, .gitattributes) never enter the layout."""
    return any(part.startswith(".") for part in path.relative_to(below).parts)


def _visible_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [path for path in folder.rglob("*") if path.is_file() and not _is_hidden(path, folder)]


def _move_into(source: Path, destination: Path) -> None:
    """Replace `destination` with `source` (a file or a folder), across file systems if need be."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.is_dir() and not destination.is_symlink():
        shutil.rmtree(destination)
    elif destination.exists() or destination.is_symlink():
        destination.unlink()
    shutil.move(str(source), str(destination))


def _everything(files: Sequence[str]) -> list[str]:
    return [name for name in files if not Path(name).name.startswith(".")]


def _one_weight_format(files: Sequence[str]) -> list[str]:
    """Base repositories publish the same weights as .safetensors and .bin (sometimes Flax/TF
    too): fetch only one copy, safetensors whenever it is published."""
    chosen = ".safetensors" if any(name.endswith(".safetensors") for name in files) else ".bin"
    other_formats = tuple(fmt for fmt in (".safetensors", ".bin", ".h5", ".msgpack") if fmt != chosen)
    unwanted = other_formats + tuple(f"{fmt}.index.json" for fmt in other_formats)
    return [name for name in _everything(files) if not name.endswith(unwanted)]


@dataclass(frozen=True)
class HubFolder:
    """A hub repository whose files make up one folder of the layout.

    The repository may keep that folder at its root or in a subfolder: after the download, the
    shallowest folder that holds every `required` file is the one placed at `target`.
    """

    label: str
    part: Part
    repo_id: str
    target: Callable[[ModelLayout], Path]
    required: tuple[RequiredFile, ...]
    select: Callable[[Sequence[str]], list[str]] = _everything

    def missing(self, layout: ModelLayout) -> list[Path]:
        return missing_files(self.target(layout), self.required)

    def choose(self, repo_files: Sequence[str], layout: ModelLayout) -> list[str]:
        return self.select(repo_files)

    def place(self, staging: Path, layout: ModelLayout) -> int:
        """Move the downloaded folder into the layout; returns the number of files placed."""
        folders = [staging, *(path for path in staging.rglob("*") if path.is_dir())]
        candidates = sorted(
            (folder for folder in folders if not _is_hidden(folder, staging)),
            key=lambda folder: (len(folder.relative_to(staging).parts), str(folder)),
        )
        found = next((folder for folder in candidates if not missing_files(folder, self.required)), None)
        if found is None:
            names = ", ".join(need.name for need in self.required)
            raise DownloadError(f"{self.repo_id} has no folder with {names} (download left in {staging})")
        placed = len(_visible_files(found))
        target = self.target(layout)
        for entry in found.iterdir():
            if not entry.name.startswith("."):
                _move_into(entry, target / entry.name)
        return placed

    def size(self, layout: ModelLayout) -> int:
        return sum(path.stat().st_size for path in _visible_files(self.target(layout)))


@dataclass(frozen=True)
class HubFile:
    """One file of a hub repository, found by its name wherever the repository keeps it."""

    label: str
    part: Part
    repo_id: str
    target: Callable[[ModelLayout], Path]

    def missing(self, layout: ModelLayout) -> list[Path]:
        path = self.target(layout)
        return [] if _is_nonempty_file(path) else [path]

    def choose(self, repo_files: Sequence[str], layout: ModelLayout) -> list[str]:
        name = self.target(layout).name
        matches = sorted((f for f in repo_files if Path(f).name == name), key=lambda f: (f.count("/"), f))
        return matches[:1]

    def place(self, staging: Path, layout: ModelLayout) -> int:
        target = self.target(layout)
        downloaded = [path for path in _visible_files(staging) if path.name == target.name]
        if not downloaded:
            raise DownloadError(f"{self.repo_id}: {target.name} did not arrive (download left in {staging})")
        _move_into(downloaded[0], target)
        return 1

    def size(self, layout: ModelLayout) -> int:
        return self.target(layout).stat().st_size


HubComponent = HubFolder | HubFile


def _adapter_folder(task: Task) -> HubFolder:
    return HubFolder(
        label=f"LoRA adapter {task.value}",
        part="llm",
        repo_id=adapter_repo(task),
        target=lambda layout: layout.adapter_dir(task),
        required=ADAPTER_FILES,
    )


HUB_COMPONENTS: tuple[HubComponent, ...] = (
    HubFolder(
        label="Polyglot-Ko 1.3B base model",
        part="llm",
        repo_id=BASE_MODEL_REPO,
        target=lambda layout: layout.base_model_dir,
        required=BASE_MODEL_FILES,
        select=_one_weight_format,
    ),
    *(_adapter_folder(task) for task in TASKS),
    HubFolder(
        label="S-BERT memory encoder",
        part="sbert",
        repo_id=SBERT_REPO,
        target=lambda layout: layout.sbert_dir,
        required=SBERT_FILES,
    ),
    HubFile(
        label="StyleGAN-VectorFind-v7 generator",
        part="stylegan",
        repo_id=STYLEGAN_REPO,
        target=lambda layout: layout.generator_path,
    ),
    HubFile(
        label="Property Score CNN",
        part="stylegan",
        repo_id=STYLEGAN_REPO,
        target=lambda layout: layout.property_cnn_path,
    ),
)


@dataclass(frozen=True)
class PinnedFile:
    """A data file whose exact bytes are known in advance."""

    relative_path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class PinnedFileSet:
    """Files fetched from `base_url` + their relative path into the same relative path under
    `target`, each checked against its sha256."""

    label: str
    base_url: str
    target: Callable[[ModelLayout], Path]
    files: tuple[PinnedFile, ...]

    def url(self, file: PinnedFile) -> str:
        return self.base_url + file.relative_path

    def path(self, layout: ModelLayout, file: PinnedFile) -> Path:
        return self.target(layout) / file.relative_path

    def stale(self, layout: ModelLayout) -> list[PinnedFile]:
        """The files absent from `layout` or with other bytes than pinned."""
        return [file for file in self.files if not _has_expected_bytes(self.path(layout, file), file)]


VECTORFIND_REPOSITORY = "WannaBeSuperteur/AI_Projects"
VECTORFIND_COMMIT = "2cb8d2f68011974bf94fe65b15a26a73d467b44c"
VECTORFIND_FOLDER = "2025_05_02_OhLoRA_v2/stylegan/stylegan_vectorfind_v7"

# The upstream files at the pinned commit (older commits hold different change vectors).
VECTORFIND_V7 = PinnedFileSet(
    label="VectorFind-v7 data",
    base_url=f"https://raw.githubusercontent.com/{VECTORFIND_REPOSITORY}/{VECTORFIND_COMMIT}/{VECTORFIND_FOLDER}/",
    target=lambda layout: layout.vectorfind_dir,
    files=(
        PinnedFile("ohlora_z_vectors.csv", 104711, "59b13e62d4e21fb2b0d1e4e49d4f1102b0b9d924d9dba70a94cae708c9a2deaa"),
        PinnedFile("ohlora_w_group_names.csv", 993, "090f13df0b9ba765858da4fbbb3934b2cd1e5022b0d60ba43b6d7b16f8065c2e"),
        PinnedFile(
            "property_score_vectors/eyes_change_w_vector_hhh.csv",
            8217,
            "5caa072ad0ac6be54fcd8040a6c2ab907e31f744a6801c5fa6510d5767ab0641",
        ),
        PinnedFile(
            "property_score_vectors/eyes_change_w_vector_hhl.csv",
            8243,
            "107dd11615689bb66be65254456ad4e455e8bd6789fc2a3fb1406b2ac48a42d4",
        ),
        PinnedFile(
            "property_score_vectors/eyes_change_w_vector_hlh.csv",
            8238,
            "7ede8a0a9f8d621e5a06e983bd674a52746276dd501c96716dc7f561c96cc113",
        ),
        PinnedFile(
            "property_score_vectors/eyes_change_w_vector_hll.csv",
            8228,
            "1c597d23f36839e9547ba1c2c506ff70460156a4037a01f5136c03a37b15f4ea",
        ),
        PinnedFile(
            "property_score_vectors/eyes_change_w_vector_lhh.csv",
            8197,
            "262b8e4304daaddd7436573a45c99da22c4556b83eee979d79a56d67f8fb59ee",
        ),
        PinnedFile(
            "property_score_vectors/eyes_change_w_vector_lhl.csv",
            8253,
            "7f163a1460f57a0ba497b2492b454b9266884c6c823f99c826b61fd3f72bef55",
        ),
        PinnedFile(
            "property_score_vectors/eyes_change_w_vector_llh.csv",
            8211,
            "22528d80cb730f0edc4b28a6c223dde31742e7382648fc253582d8462130ebb5",
        ),
        PinnedFile(
            "property_score_vectors/eyes_change_w_vector_lll.csv",
            8222,
            "806dc221624dd3dcb3d38b900b9c07aac59164f218b95b3d22ec474504fcee29",
        ),
        PinnedFile(
            "property_score_vectors/mouth_change_w_vector_hhh.csv",
            8250,
            "774f8572832102b08d2654ae92aa5e8d30fc7b6f42dab4d863f3d20ef552ffb7",
        ),
        PinnedFile(
            "property_score_vectors/mouth_change_w_vector_hhl.csv",
            8208,
            "009a83fc25964d9dc320f3c40063e041ace62296f6d8bf6b640705ce997be81a",
        ),
        PinnedFile(
            "property_score_vectors/mouth_change_w_vector_hlh.csv",
            8217,
            "4f824b6a0ffe843365c8154955dd9522e637ac2eb6df3fa037a6498046dca7df",
        ),
        PinnedFile(
            "property_score_vectors/mouth_change_w_vector_hll.csv",
            8216,
            "40c9dac7ca6aa08f21da4e50d01a9c2f7518d9a281f4d40209a7ef859dc1a366",
        ),
        PinnedFile(
            "property_score_vectors/mouth_change_w_vector_lhh.csv",
            8215,
            "0a20bfbeff87dcf3c9bd9f8b9b5f6153f3e63a4cb89a544dd33535296b76a41f",
        ),
        PinnedFile(
            "property_score_vectors/mouth_change_w_vector_lhl.csv",
            8230,
            "15b976bde1b8996af6fcd710977182f0b5fbde91757f164b755f82ec556db6ad",
        ),
        PinnedFile(
            "property_score_vectors/mouth_change_w_vector_llh.csv",
            8234,
            "89d2d8ee2fe4a7567d693c2b82b102a9c095c99acc84c9403ff6061bcedcdc2f",
        ),
        PinnedFile(
            "property_score_vectors/mouth_change_w_vector_lll.csv",
            8218,
            "57e0c148f1000d02128d18eb62bcd11ee929f3f8bf3f89599a46755447b93934",
        ),
        PinnedFile(
            "property_score_vectors/pose_change_w_vector_hhh.csv",
            8271,
            "28b52a62749b32be3ad356dce7c1c1033717632793c5746d12db4547705753d9",
        ),
        PinnedFile(
            "property_score_vectors/pose_change_w_vector_hhl.csv",
            8260,
            "d47a4fe5ce8bd077d79993f26c7c3c2294d175b076f720006ed785457f587b89",
        ),
        PinnedFile(
            "property_score_vectors/pose_change_w_vector_hlh.csv",
            8250,
            "1f2f6c8dfe44aebceb0c621c405f1568b18c829d3dfa1a71b88cb67c8f98de59",
        ),
        PinnedFile(
            "property_score_vectors/pose_change_w_vector_hll.csv",
            8258,
            "8c3f8cfdc3d92f2ba44be1390c80f17167ef105d526aac8b90ffde0454ff47fd",
        ),
        PinnedFile(
            "property_score_vectors/pose_change_w_vector_lhh.csv",
            8223,
            "deaacccb1a9b361adaa366f9d5fe41766063e0f8e15fe4eab70c5c5b346d90b1",
        ),
        PinnedFile(
            "property_score_vectors/pose_change_w_vector_lhl.csv",
            8226,
            "5b8c2f971bce2479ff1325d902d850e0c6d94e8ea17fd28d2fce2e44046cc0a2",
        ),
        PinnedFile(
            "property_score_vectors/pose_change_w_vector_llh.csv",
            8251,
            "ff1303aa302a8e74c182e247f0e7a9b1e96c8be54897340b8e1dad49d1da029e",
        ),
        PinnedFile(
            "property_score_vectors/pose_change_w_vector_lll.csv",
            8199,
            "8860e2dc1f71151d913467f3f2f3f9d961a9a39a7c9d6eabd1c9d14e73d74fae",
        ),
    ),
)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _has_expected_bytes(path: Path, file: PinnedFile) -> bool:
    return path.is_file() and path.stat().st_size == file.size and sha256_of(path) == file.sha256


# ---------------------------------------------------------------------------------------------
# The start-up check
# ---------------------------------------------------------------------------------------------


def fix_command(root: Path, parts: Iterable[Part] = PARTS) -> str:
    """The command that fetches `parts` into `root`."""
    chosen = [part for part in PARTS if part in set(parts)]
    only = "" if chosen == list(PARTS) else "".join(f" --only {part}" for part in chosen)
    return f"ohlora download --models-dir {shlex.quote(str(root))}{only}"


def layout_problems(
    layout: ModelLayout, parts: Iterable[Part] = PARTS, *, data: PinnedFileSet = VECTORFIND_V7
) -> dict[Part, list[Path]]:
    """Every missing, empty or corrupt file of each part; a part that is complete is absent."""
    wanted = set(parts)
    problems: dict[Part, list[Path]] = {}
    for component in HUB_COMPONENTS:
        missing = component.missing(layout) if component.part in wanted else []
        if missing:
            problems.setdefault(component.part, []).extend(missing)
    stale = data.stale(layout) if "vectorfind" in wanted else []
    if stale:
        problems["vectorfind"] = [data.path(layout, file) for file in stale]
    return problems


def verify_layout(layout: ModelLayout, parts: Iterable[Part] = PARTS, *, data: PinnedFileSet = VECTORFIND_V7) -> None:
    """Raise one `ModelFilesMissing` naming every missing or corrupt file and the fixing command.

    Checked without loading anything: hub folders hold their required files (non-empty; every
    shard of a sharded checkpoint), the .pth files are non-empty, and every data CSV has its
    pinned sha256.
    """
    problems = layout_problems(layout, parts, data=data)
    if problems:
        missing = [path for paths in problems.values() for path in paths]
        raise ModelFilesMissing(missing, fix_command(layout.root, problems.keys()))


# ---------------------------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------------------------


class DownloadError(RuntimeError):
    """A download that cannot succeed as things are (unknown repository, missing file, ...)."""


class NetworkError(DownloadError):
    """A failure that may pass if tried again: connection lost, timeout, a 5xx answer."""


class ChecksumMismatch(DownloadError):
    """Fetched bytes that are not the pinned file (a truncated transfer, or a changed upstream)."""

    def __init__(self, path: Path, url: str, expected: str, actual: str) -> None:
        super().__init__(
            f"{path.name} from {url} has sha256 {actual}, expected {expected}; it was not written to {path}"
        )
        self.path = path


class HubClient(Protocol):
    """The two hub operations a download needs."""

    def list_files(self, repo_id: str) -> Sequence[str]:
        """Every file path of the repository's main revision, relative to its root."""
        ...

    def download(self, repo_id: str, files: Sequence[str], local_dir: Path, *, force: bool) -> None:
        """Fetch `files` into `local_dir`, keeping their repository paths; resume partial files."""
        ...


class _HiddenBar(tqdm):  # type: ignore[misc]
    """huggingface_hub takes a progress-bar class, not a switch."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **{**kwargs, "disable": True})


_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def _is_transient_hub_error(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if isinstance(exc, HfHubHTTPError):
        return exc.response.status_code in _TRANSIENT_STATUS
    if isinstance(exc, (LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        return True  # snapshot_download reports an unreachable hub as LocalEntryNotFoundError
    # The hub client's HTTP stack changed across releases (httpx, then httpx2); both name the
    # base of their connection/timeout errors TransportError.
    return any(cls.__name__ == "TransportError" for cls in type(exc).__mro__)


@contextmanager
def _hub_errors(repo_id: str) -> Iterator[None]:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        yield
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise DownloadError(
            f"{repo_id} was not found on the Hugging Face hub, or it needs a token (--token or HF_TOKEN)"
        ) from exc
    except Exception as exc:
        if _is_transient_hub_error(exc):
            raise NetworkError(f"network error while fetching {repo_id}: {exc}") from exc
        raise


@dataclass(frozen=True)
class HuggingFaceHub:
    """The real hub. `token=None` lets huggingface_hub use HF_TOKEN or the saved login.

    huggingface_hub is imported on first use: it would double the start-up time of every
    `ohlora` command, most of which never download.
    """

    token: str | None = None
    progress: bool = True

    def list_files(self, repo_id: str) -> Sequence[str]:
        from huggingface_hub import HfApi

        with _hub_errors(repo_id):
            return HfApi(token=self.token).list_repo_files(repo_id)

    def download(self, repo_id: str, files: Sequence[str], local_dir: Path, *, force: bool) -> None:
        from huggingface_hub import snapshot_download

        with _hub_errors(repo_id):
            snapshot_download(
                repo_id,
                local_dir=local_dir,
                allow_patterns=list(files),
                force_download=force,
                token=self.token,
                tqdm_class=None if self.progress else _HiddenBar,
            )


@dataclass(frozen=True)
class RetryPolicy:
    """How often a network failure or a checksum mismatch (a truncated transfer, say) is tried
    again, with exponential back-off between tries."""

    attempts: int = 3
    first_wait_s: float = 2.0
    max_wait_s: float = 30.0


def _retrying(policy: RetryPolicy, what: str) -> Retrying:
    def log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        logger.warning("%s failed (attempt %d of %d): %s", what, state.attempt_number, policy.attempts, error)

    return Retrying(
        stop=stop_after_attempt(policy.attempts),
        wait=wait_exponential(multiplier=policy.first_wait_s, max=policy.max_wait_s),
        retry=retry_if_exception_type((NetworkError, ChecksumMismatch)),
        before_sleep=log_retry,
        reraise=True,
    )


@dataclass(frozen=True)
class DownloadItem:
    """One line of the summary: a component and what this run did for it."""

    label: str
    source: str
    destination: Path
    files_fetched: int
    size_bytes: int

    @property
    def fetched(self) -> bool:
        return self.files_fetched > 0


@dataclass(frozen=True)
class DownloadReport:
    items: tuple[DownloadItem, ...]

    @property
    def files_fetched(self) -> int:
        return sum(item.files_fetched for item in self.items)

    @property
    def total_bytes(self) -> int:
        return sum(item.size_bytes for item in self.items)


def _fetch_hub_component(
    component: HubComponent, layout: ModelLayout, hub: HubClient, *, force: bool, retry: RetryPolicy
) -> int:
    """Download into staging, then move into place; returns the number of files placed."""
    repo_files = _retrying(retry, f"listing {component.repo_id}")(hub.list_files, component.repo_id)
    wanted = component.choose(repo_files, layout)
    if not wanted:
        raise DownloadError(f"{component.repo_id} has no file for the {component.label}")
    staging = layout.root / STAGING_DIR_NAME / component.repo_id.replace("/", "--")
    staging.mkdir(parents=True, exist_ok=True)
    logger.info("fetching %s from %s (%d files)", component.label, component.repo_id, len(wanted))
    download = _retrying(retry, f"downloading {component.repo_id}")
    download(hub.download, component.repo_id, wanted, staging, force=force)
    placed = component.place(staging, layout)
    shutil.rmtree(staging)
    if not any(staging.parent.iterdir()):
        staging.parent.rmdir()
    return placed


def _fetch_pinned_file(data: PinnedFileSet, file: PinnedFile, destination: Path, http: httpx.Client) -> None:
    """Stream into a .part file while hashing; rename it into place only when the hash matches."""
    url = data.url(file)
    partial = destination.with_name(destination.name + ".part")
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    try:
        with http.stream("GET", url) as response:
            if response.status_code in _TRANSIENT_STATUS:
                raise NetworkError(f"{url} answered {response.status_code}")
            if response.status_code != 200:
                raise DownloadError(f"{url} answered {response.status_code}")
            with partial.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    digest.update(chunk)
        if digest.hexdigest() != file.sha256:
            raise ChecksumMismatch(destination, url, file.sha256, digest.hexdigest())
        os.replace(partial, destination)
    except httpx.TransportError as exc:
        raise NetworkError(f"network error while fetching {url}: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)


def _fetch_pinned_files(
    data: PinnedFileSet,
    layout: ModelLayout,
    http: httpx.Client,
    *,
    force: bool,
    progress: bool,
    retry: RetryPolicy,
) -> int:
    todo = list(data.files) if force else data.stale(layout)
    if not todo:
        return 0
    logger.info("fetching %d of the %d %s files", len(todo), len(data.files), data.label)
    with tqdm(total=len(todo), desc=data.label, unit="file", disable=not progress) as bar:
        for file in todo:
            fetch = _retrying(retry, f"fetching {file.relative_path}")
            fetch(_fetch_pinned_file, data, file, data.path(layout, file), http)
            bar.update(1)
    return len(todo)


def download_all(
    layout: ModelLayout,
    *,
    parts: Iterable[Part] = PARTS,
    force: bool = False,
    progress: bool = True,
    hf_token: str | None = None,
    hub: HubClient | None = None,
    http: httpx.Client | None = None,
    retry: RetryPolicy = RetryPolicy(),
    data: PinnedFileSet = VECTORFIND_V7,
) -> DownloadReport:
    """Fetch whatever `parts` still lack into `layout`; with `force`, fetch everything again.

    `hub` and `http` default to the real Hugging Face hub and a fresh httpx client; pass fakes
    to run without a network. `hf_token` is only used by the default hub client.
    """
    wanted = set(parts)
    items: list[DownloadItem] = []
    hub_client = hub if hub is not None else HuggingFaceHub(token=hf_token, progress=progress)
    for component in HUB_COMPONENTS:
        if component.part not in wanted:
            continue
        fetched = 0
        if force or component.missing(layout):
            fetched = _fetch_hub_component(component, layout, hub_client, force=force, retry=retry)
        else:
            logger.info("%s is already in %s", component.label, component.target(layout))
        target = component.target(layout)
        items.append(DownloadItem(component.label, component.repo_id, target, fetched, component.size(layout)))
    if "vectorfind" in wanted:
        with ExitStack() as owned:
            http_client = http or owned.enter_context(httpx.Client(follow_redirects=True, timeout=30.0))
            fetched = _fetch_pinned_files(data, layout, http_client, force=force, progress=progress, retry=retry)
        size = sum(data.path(layout, file).stat().st_size for file in data.files)
        items.append(DownloadItem(data.label, data.base_url, data.target(layout), fetched, size))
    return DownloadReport(tuple(items))


# ---------------------------------------------------------------------------------------------
# The `ohlora download` command
# ---------------------------------------------------------------------------------------------

LAYOUT_HELP = f"""\
files under the models folder (--models-dir; default ${MODELS_DIR_ENV} or {DEFAULT_MODELS_DIR}):

  llm/models/
    polyglot_original/                     base model {BASE_MODEL_REPO}
                                           config.json, model*.safetensors, tokenizer files
    polyglot_output_message_fine_tuned/    LoRA adapter {adapter_repo(Task.OUTPUT_MESSAGE)}
    polyglot_memory_fine_tuned/            LoRA adapter {adapter_repo(Task.MEMORY)}
    polyglot_summary_fine_tuned/           LoRA adapter {adapter_repo(Task.SUMMARY)}
    polyglot_eyes_mouth_pose_fine_tuned/   LoRA adapter {adapter_repo(Task.EYES_MOUTH_POSE)}
                                           each: adapter_config.json, adapter_model.safetensors,
                                           tokenizer.json, tokenizer_config.json
    memory_sbert/trained_sbert_model/      S-BERT {SBERT_REPO}
                                           a sentence-transformers folder (modules.json,
                                           config.json, model.safetensors, tokenizer files)
  stylegan/models/
    stylegan_gen_vector_find_v7.pth        face generator, from {STYLEGAN_REPO}
    stylegan_gen_fine_tuned_v2_cnn.pth     Property Score CNN, same repository
  stylegan/stylegan_vectorfind_v7/         VectorFind-v7 data, GitHub {VECTORFIND_REPOSITORY}
                                           at commit {VECTORFIND_COMMIT[:12]}, sha256-checked
    ohlora_z_vectors.csv
    ohlora_w_group_names.csv
    property_score_vectors/{{eyes,mouth,pose}}_change_w_vector_{{hhh,hhl,...,lll}}.csv

This is the original Oh-LoRA v2 project's layout: a folder already laid out that way can be used
as it is (`ohlora download --check` tells what, if anything, is missing). Downloads are resumed
and files already in place are not fetched again.
"""


def configure_download_parser(parser: argparse.ArgumentParser) -> None:
    """Options of `ohlora download`; the CLI calls `run_download` with the parsed arguments."""
    if parser.description is None:
        parser.description = "Fetch the Oh-LoRA v2 checkpoints and data into the models folder, or check it."
    parser.epilog = LAYOUT_HELP
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help=f"the models folder (default: ${MODELS_DIR_ENV} or {DEFAULT_MODELS_DIR})",
    )
    parser.add_argument(
        "--only",
        dest="parts",
        action="append",
        choices=PARTS,
        help="fetch or check only this part; repeat for several (default: all)",
    )
    parser.add_argument("--force", action="store_true", help="fetch everything again, even files already in place")
    parser.add_argument(
        "--token",
        default=None,
        help="Hugging Face token (default: $HF_TOKEN or the token saved by `hf auth login`)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check the folder, without any network access; exit status 1 when incomplete",
    )


def _human_size(size: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _fetched(count: int) -> str:
    return f"fetched {count} file" if count == 1 else f"fetched {count} files"


def format_report(report: DownloadReport) -> str:
    """The summary table printed after a download."""
    rows = [("component", "this run", "size")]
    for item in report.items:
        status = _fetched(item.files_fetched) if item.fetched else "already present"
        rows.append((item.label, status, _human_size(item.size_bytes)))
    rows.append(("total", _fetched(report.files_fetched), _human_size(report.total_bytes)))
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    lines = [f"{label:<{widths[0]}}  {status:<{widths[1]}}  {size:>9}" for label, status, size in rows]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([lines[0], rule, *lines[1:-1], rule, lines[-1]])


def run_download(args: argparse.Namespace, *, hub: HubClient | None = None, http: httpx.Client | None = None) -> int:
    """`ohlora download`: 0 when the folder is complete afterwards, 1 otherwise.

    `hub` and `http` replace the network in tests.
    """
    root = args.models_dir or Path(os.environ.get(MODELS_DIR_ENV) or DEFAULT_MODELS_DIR)
    layout = ModelLayout(root)
    parts: tuple[Part, ...] = tuple(part for part in PARTS if part in set(args.parts or PARTS))
    if args.check:
        try:
            verify_layout(layout, parts)
        except ModelFilesMissing as exc:
            sys.stderr.write(f"{exc}\n")
            return 1
        sys.stdout.write(f"{root}: every file of {', '.join(parts)} is in place.\n")
        return 0
    token = args.token or os.environ.get("HF_TOKEN") or None
    try:
        report = download_all(layout, parts=parts, force=args.force, hf_token=token, hub=hub, http=http)
    except DownloadError as exc:
        sys.stderr.write(f"download failed: {exc}\n")
        return 1
    sys.stdout.write(f"{format_report(report)}\nmodels folder: {root}\n")
    return 0
