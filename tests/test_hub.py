"""Downloads and the start-up layout check, against a fake hub and a fake web server.

Nothing here reaches the network: an autouse fixture makes the real hub client and httpx's real
transport fail loudly, so a missed injection is a test failure rather than a download.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import httpx
import huggingface_hub
import pytest
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

from core.types import Task
from models import hub
from models.errors import ModelFilesMissing
from models.hub import (
    BASE_MODEL_REPO,
    HUB_COMPONENTS,
    SBERT_REPO,
    STYLEGAN_REPO,
    VECTORFIND_COMMIT,
    VECTORFIND_V7,
    ChecksumMismatch,
    DownloadError,
    DownloadReport,
    NetworkError,
    PinnedFile,
    PinnedFileSet,
    RetryPolicy,
    adapter_repo,
    configure_download_parser,
    download_all,
    run_download,
    verify_layout,
)
from models.layout import TASKS, ModelLayout

NO_WAIT = RetryPolicy(attempts=3, first_wait_s=0, max_wait_s=0)
GROUPS = tuple("".join(letters) for letters in itertools.product("hl", repeat=3))
PROPERTIES = ("eyes", "mouth", "pose")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", refuse)
    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", refuse)


# ---------------------------------------------------------------------------------------------
# Fakes
# ---------------------------------------------------------------------------------------------


def _write(path: Path, content: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)


def _sbert_files() -> dict[str, str]:
    return {
        "modules.json": "[]",
        "config.json": '{"model_type": "roberta"}',
        "config_sentence_transformers.json": "{}",
        "sentence_bert_config.json": '{"max_seq_length": 64}',
        "model.safetensors": "sbert weights",
        "tokenizer.json": "{}",
        "tokenizer_config.json": "{}",
        "vocab.txt": "[PAD]\n",
        "1_Pooling/config.json": '{"pooling_mode_mean_tokens": true}',
        "eval/similarity_evaluation_valid_evaluator_results.csv": "epoch,score\n",
    }


def build_fake_repos(root: Path, *, sbert_subfolder: str = "") -> dict[str, Path]:
    """Hub repositories shaped like the published ones, each a folder of small files."""
    repos: dict[str, dict[str, str]] = {
        BASE_MODEL_REPO: {
            ".gitattributes": "*.bin filter=lfs",
            "README.md": "# polyglot",
            "config.json": '{"model_type": "gpt_neox"}',
            "model.safetensors.index.json": json.dumps(
                {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
            ),
            "model-00001-of-00002.safetensors": "shard one",
            "model-00002-of-00002.safetensors": "shard two",
            "pytorch_model.bin.index.json": json.dumps({"weight_map": {"a": "pytorch_model-00001-of-00001.bin"}}),
            "pytorch_model-00001-of-00001.bin": "the same weights again",
            "tokenizer.json": "{}",
            "tokenizer_config.json": "{}",
        },
        SBERT_REPO: {
            "README.md": "# sbert",
            **{f"{sbert_subfolder}{name}": content for name, content in _sbert_files().items()},
        },
        STYLEGAN_REPO: {
            "README.md": "# stylegan",
            "stylegan_gen_vector_find_v7.pth": "generator weights",
            "stylegan_gen_fine_tuned_v2_cnn.pth": "cnn weights",
            "stylegan_gen_fine_tuned_v1.pth": "an older generator nobody needs",
        },
    }
    for task in TASKS:
        repos[adapter_repo(task)] = {
            "adapter_config.json": json.dumps({"base_model_name_or_path": "/home/author/polyglot"}),
            "adapter_model.safetensors": f"lora weights {task.value}",
            "special_tokens_map.json": "{}",
            "tokenizer.json": "{}",
            "tokenizer_config.json": "{}",
            "training_args.bin": "pickle",
        }
    folders = {}
    for repo_id, files in repos.items():
        folder = root / repo_id.replace("/", "--")
        for name, content in files.items():
            _write(folder / name, content)
        folders[repo_id] = folder
    return folders


class FakeHub:
    """Serves repositories from local folders and records every call."""

    def __init__(self, repos: Mapping[str, Path]) -> None:
        self.repos = dict(repos)
        self.listed: list[str] = []
        self.downloads: list[tuple[str, tuple[str, ...], bool]] = []
        self.failures: dict[str, list[Exception]] = {}

    def list_files(self, repo_id: str) -> list[str]:
        self.listed.append(repo_id)
        if repo_id not in self.repos:
            raise DownloadError(f"{repo_id} not found")
        root = self.repos[repo_id]
        return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())

    def download(self, repo_id: str, files: Sequence[str], local_dir: Path, *, force: bool) -> None:
        self.downloads.append((repo_id, tuple(files), force))
        pending = self.failures.get(repo_id)
        if pending:
            raise pending.pop(0)
        # huggingface_hub keeps its own bookkeeping here; it must never reach the layout.
        _write(local_dir / ".cache" / "huggingface" / "download" / "x.metadata", "etag")
        for name in files:
            _write(local_dir / name, (self.repos[repo_id] / name).read_bytes())

    @property
    def calls(self) -> int:
        return len(self.listed) + len(self.downloads)

    def reset(self) -> None:
        self.listed.clear()
        self.downloads.clear()


Response = Callable[[httpx.Request], httpx.Response]


class FakeWeb:
    """An httpx transport serving fixed bytes per URL; `script` queues misbehaviour per URL."""

    def __init__(self, files: Mapping[str, bytes]) -> None:
        self.files = dict(files)
        self.requests: list[str] = []
        self.script: dict[str, list[Response]] = {}

    def handle(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        self.requests.append(url)
        queued = self.script.get(url)
        if queued:
            return queued.pop(0)(request)
        if url not in self.files:
            return httpx.Response(404)
        return httpx.Response(200, content=self.files[url])

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self.handle))


def fake_data_set() -> tuple[PinnedFileSet, dict[str, bytes]]:
    """The real file list under a fake URL, with made-up contents and their true hashes."""
    contents = {file.relative_path: f"fake csv {file.relative_path}\n".encode() for file in VECTORFIND_V7.files}
    data = replace(
        VECTORFIND_V7,
        base_url="https://data.test/vf7/",
        files=tuple(
            PinnedFile(path, len(content), hashlib.sha256(content).hexdigest()) for path, content in contents.items()
        ),
    )
    return data, {data.url(file): contents[file.relative_path] for file in data.files}


class World:
    """A models folder plus the fake hub and web it downloads from."""

    def __init__(self, tmp_path: Path, *, sbert_subfolder: str = "") -> None:
        self.repos = build_fake_repos(tmp_path / "hub", sbert_subfolder=sbert_subfolder)
        self.hub = FakeHub(self.repos)
        self.data, served = fake_data_set()
        self.web = FakeWeb(served)
        self.layout = ModelLayout(tmp_path / "models")

    def download(self, **kwargs: object) -> DownloadReport:
        with self.web.client() as http:
            return download_all(
                self.layout,
                hub=self.hub,
                http=http,
                data=self.data,
                progress=False,
                retry=NO_WAIT,
                **kwargs,  # type: ignore[arg-type]
            )

    def csv_url(self, path: Path) -> str:
        relative = path.relative_to(self.layout.vectorfind_dir).as_posix()
        return self.data.base_url + relative


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


@pytest.fixture
def downloaded(world: World) -> Iterator[World]:
    world.download()
    world.hub.reset()
    world.web.requests.clear()
    yield world


def _all_files(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}


# ---------------------------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sbert_subfolder", ["", "trained_sbert_model/"], ids=["sbert-at-root", "sbert-in-subfolder"])
def test_download_places_every_file_where_the_layout_says(tmp_path: Path, sbert_subfolder: str) -> None:
    world = World(tmp_path, sbert_subfolder=sbert_subfolder)
    report = world.download()
    layout = world.layout

    verify_layout(layout, data=world.data)
    for task in TASKS:
        adapter = world.repos[adapter_repo(task)]
        assert _all_files(layout.adapter_dir(task)) == _all_files(adapter)
        placed = (layout.adapter_dir(task) / "adapter_model.safetensors").read_text()
        assert placed == f"lora weights {task.value}"
    assert _all_files(layout.sbert_dir) == set(_sbert_files()) | ({"README.md"} if not sbert_subfolder else set())
    assert (layout.sbert_dir / "1_Pooling" / "config.json").is_file()
    assert layout.generator_path.read_text() == "generator weights"
    assert layout.property_cnn_path.read_text() == "cnn weights"
    assert _all_files(layout.stylegan_models_dir) == {layout.generator_path.name, layout.property_cnn_path.name}
    base_files = _all_files(layout.base_model_dir)
    assert {"config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"} <= base_files
    assert not [name for name in base_files if ".bin" in name], "only one weight format is fetched"
    assert not (layout.root / hub.STAGING_DIR_NAME).exists()
    assert not list(layout.root.rglob(".cache"))
    assert report.files_fetched == sum(1 for path in layout.root.rglob("*") if path.is_file())


def test_csvs_land_on_every_path_the_layout_names(world: World) -> None:
    world.download(parts=["vectorfind"])
    layout = world.layout
    expected = {layout.z_vectors_csv, layout.group_names_csv} | {
        layout.change_vector_csv(prop, group) for prop in PROPERTIES for group in GROUPS
    }
    assert {path for path in layout.root.rglob("*") if path.is_file()} == expected
    assert world.hub.calls == 0
    assert layout.z_vectors_csv.read_bytes() == world.web.files[world.csv_url(layout.z_vectors_csv)]


def test_second_run_fetches_nothing(downloaded: World) -> None:
    report = downloaded.download()

    assert downloaded.hub.calls == 0
    assert downloaded.web.requests == []
    assert report.files_fetched == 0
    assert [item.label for item in report.items] == [c.label for c in HUB_COMPONENTS] + ["VectorFind-v7 data"]
    assert report.total_bytes == sum(
        path.stat().st_size for path in downloaded.layout.root.rglob("*") if path.is_file()
    )


def test_force_fetches_everything_again(downloaded: World) -> None:
    downloaded.download(force=True)

    fetched_repos = [repo for repo, _, force in downloaded.hub.downloads if force]
    assert sorted(fetched_repos) == sorted(component.repo_id for component in HUB_COMPONENTS)
    assert len(downloaded.web.requests) == len(VECTORFIND_V7.files)
    verify_layout(downloaded.layout, data=downloaded.data)


def test_only_the_missing_component_is_fetched(downloaded: World) -> None:
    (downloaded.layout.adapter_dir(Task.SUMMARY) / "tokenizer_config.json").unlink()
    downloaded.layout.property_cnn_path.unlink()

    downloaded.download()

    assert [repo for repo, _, _ in downloaded.hub.downloads] == [adapter_repo(Task.SUMMARY), STYLEGAN_REPO]
    assert downloaded.hub.downloads[1][1] == ("stylegan_gen_fine_tuned_v2_cnn.pth",)
    assert downloaded.web.requests == []
    verify_layout(downloaded.layout, data=downloaded.data)


def test_corrupted_csv_is_fetched_again(downloaded: World) -> None:
    damaged = downloaded.layout.change_vector_csv("mouth", "lhl")
    good = damaged.read_bytes()
    damaged.write_bytes(good.replace(b"fake", b"fike"))

    downloaded.download()

    assert downloaded.web.requests == [downloaded.csv_url(damaged)]
    assert damaged.read_bytes() == good


def test_persistent_bad_hash_fails_naming_the_file(world: World) -> None:
    target = world.layout.change_vector_csv("pose", "hlh")
    url = world.csv_url(target)
    world.web.files[url] = b"not the pinned bytes\n"

    with pytest.raises(ChecksumMismatch, match="pose_change_w_vector_hlh.csv") as raised:
        world.download(parts=["vectorfind"])

    assert raised.value.path == target
    assert world.web.requests.count(url) == NO_WAIT.attempts
    assert not target.exists()
    assert not target.with_name(target.name + ".part").exists()


def test_transient_network_errors_are_retried(world: World) -> None:
    url = world.csv_url(world.layout.z_vectors_csv)

    def connection_lost(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection reset", request=request)

    world.web.script[url] = [connection_lost, lambda request: httpx.Response(503)]

    world.download(parts=["vectorfind"])

    assert world.web.requests.count(url) == 3
    assert world.layout.z_vectors_csv.read_bytes() == world.web.files[url]


def test_network_that_stays_down_fails_after_a_few_attempts(world: World) -> None:
    url = world.csv_url(world.layout.group_names_csv)
    world.web.script[url] = [lambda request: httpx.Response(502)] * 10

    with pytest.raises(NetworkError, match="502"):
        world.download(parts=["vectorfind"])

    assert world.web.requests.count(url) == NO_WAIT.attempts


def test_missing_upstream_file_is_not_retried(world: World) -> None:
    url = world.csv_url(world.layout.group_names_csv)
    del world.web.files[url]

    with pytest.raises(DownloadError, match="404"):
        world.download(parts=["vectorfind"])

    assert world.web.requests.count(url) == 1


def test_hub_download_is_retried_after_a_transient_failure(world: World) -> None:
    world.hub.failures[SBERT_REPO] = [NetworkError("connection reset")]

    world.download(parts=["sbert"])

    assert [repo for repo, _, _ in world.hub.downloads] == [SBERT_REPO, SBERT_REPO]
    assert (world.layout.sbert_dir / "model.safetensors").is_file()


def test_repository_without_the_expected_files_fails_clearly(world: World) -> None:
    (world.repos[adapter_repo(Task.MEMORY)] / "adapter_config.json").unlink()

    with pytest.raises(DownloadError, match="250502_OhLoRA_LLM_memory .*adapter_config.json"):
        world.download(parts=["llm"])

    assert not (world.layout.adapter_dir(Task.MEMORY) / "adapter_model.safetensors").exists()


def test_only_the_requested_parts_are_touched(world: World) -> None:
    report = world.download(parts=["stylegan"])

    assert set(world.hub.listed) == {STYLEGAN_REPO}
    assert world.web.requests == []
    assert [item.label for item in report.items] == ["StyleGAN-VectorFind-v7 generator", "Property Score CNN"]


# ---------------------------------------------------------------------------------------------
# The start-up check
# ---------------------------------------------------------------------------------------------


def test_verify_on_an_empty_folder_names_every_file_and_the_command(tmp_path: Path) -> None:
    layout = ModelLayout(tmp_path / "models")

    with pytest.raises(ModelFilesMissing) as raised:
        verify_layout(layout)

    message = str(raised.value)
    expected = [
        layout.base_model_dir / "config.json",
        layout.base_model_dir / "model.safetensors",
        *(
            layout.adapter_dir(task) / name
            for task in TASKS
            for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json")
        ),
        layout.sbert_dir / "config.json",
        layout.sbert_dir / "model.safetensors",
        layout.generator_path,
        layout.property_cnn_path,
        layout.z_vectors_csv,
        layout.group_names_csv,
        *(layout.change_vector_csv(prop, group) for prop in PROPERTIES for group in GROUPS),
    ]
    for path in expected:
        assert str(path) in message
    assert set(expected) <= set(raised.value.missing)
    assert f"ohlora download --models-dir {layout.root}" in message
    assert "--only" not in message


def test_verify_passes_on_a_complete_layout(downloaded: World) -> None:
    verify_layout(downloaded.layout, data=downloaded.data)


def test_verify_names_a_corrupt_csv_and_only_its_part(downloaded: World) -> None:
    corrupt = downloaded.layout.change_vector_csv("eyes", "llh")
    corrupt.write_bytes(b"x" + corrupt.read_bytes()[1:])

    with pytest.raises(ModelFilesMissing) as raised:
        verify_layout(downloaded.layout, data=downloaded.data)

    assert raised.value.missing == (corrupt,)
    assert f"--models-dir {downloaded.layout.root} --only vectorfind" in str(raised.value)


def test_verify_names_a_missing_shard_and_an_empty_checkpoint(downloaded: World) -> None:
    shard = downloaded.layout.base_model_dir / "model-00002-of-00002.safetensors"
    shard.unlink()
    downloaded.layout.generator_path.write_bytes(b"")

    with pytest.raises(ModelFilesMissing) as raised:
        verify_layout(downloaded.layout, data=downloaded.data)

    assert raised.value.missing == (shard, downloaded.layout.generator_path)
    assert "--only llm --only stylegan" in str(raised.value)


def test_verify_accepts_the_bin_alternatives(downloaded: World) -> None:
    adapter = downloaded.layout.adapter_dir(Task.OUTPUT_MESSAGE)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")

    verify_layout(downloaded.layout, ["llm"])


def test_verify_checks_only_the_requested_parts(tmp_path: Path) -> None:
    layout = ModelLayout(tmp_path)
    _write(layout.generator_path, "g")
    _write(layout.property_cnn_path, "c")

    verify_layout(layout, ["stylegan"])
    with pytest.raises(ModelFilesMissing):
        verify_layout(layout, ["stylegan", "sbert"])


# ---------------------------------------------------------------------------------------------
# Hub error classification
# ---------------------------------------------------------------------------------------------


def _hub_http_error(cls: type[HfHubHTTPError], status: int) -> HfHubHTTPError:
    response = httpx.Response(status, request=httpx.Request("GET", "https://hub.test/api"))
    return cls(f"status {status}", response=response)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (_hub_http_error(HfHubHTTPError, 503), True),
        (_hub_http_error(HfHubHTTPError, 429), True),
        (_hub_http_error(HfHubHTTPError, 403), False),
        (LocalEntryNotFoundError("hub unreachable"), True),
        (httpx.ConnectError("refused"), True),
        (ValueError("a bug"), False),
    ],
)
def test_hub_errors_are_classified(error: Exception, transient: bool) -> None:
    assert hub._is_transient_hub_error(error) is transient


def test_real_hub_client_asks_for_exactly_the_chosen_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, object]] = []

    def snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(kwargs["local_dir"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    files = ["config.json", "model.safetensors"]

    hub.HuggingFaceHub(token="hf_secret", progress=False).download("org/repo", files, tmp_path, force=True)

    [call] = calls
    assert call["repo_id"] == "org/repo"
    assert call["local_dir"] == tmp_path
    assert call["allow_patterns"] == files
    assert call["force_download"] is True
    assert call["token"] == "hf_secret"
    bar_class = call["tqdm_class"]
    assert isinstance(bar_class, type)
    with bar_class(total=3) as bar:
        assert bar.disable


def test_real_hub_client_turns_an_unreachable_hub_into_a_network_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(repo_id: str, **kwargs: object) -> str:
        raise LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)

    with pytest.raises(NetworkError, match="org/repo"):
        hub.HuggingFaceHub().download("org/repo", ["a"], tmp_path, force=False)


def test_unknown_repository_becomes_a_clear_error() -> None:
    with pytest.raises(DownloadError, match="daebakgazua/nope .*token"):
        with hub._hub_errors("daebakgazua/nope"):
            raise _hub_http_error(RepositoryNotFoundError, 404)


# ---------------------------------------------------------------------------------------------
# The `ohlora download` command
# ---------------------------------------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ohlora download")
    configure_download_parser(parser)
    return parser.parse_args(argv)


def test_help_describes_the_layout() -> None:
    parser = argparse.ArgumentParser(prog="ohlora download")
    configure_download_parser(parser)
    text = parser.format_help()

    layout = ModelLayout(Path("root"))
    for component in HUB_COMPONENTS:
        assert component.repo_id in text
        assert component.target(layout).name in text
    for folder in (layout.llm_dir, layout.stylegan_models_dir, layout.vectorfind_dir):
        assert f"{folder.relative_to(layout.root).as_posix()}/" in text
    assert "memory_sbert/trained_sbert_model/" in text
    assert "property_score_vectors/{eyes,mouth,pose}_change_w_vector_" in text
    assert VECTORFIND_COMMIT[:12] in text
    for option in ("--models-dir", "--only", "--force", "--token", "--check"):
        assert option in text


def test_check_exit_codes(downloaded: World, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(downloaded.layout.root)

    assert run_download(_parse("--models-dir", root, "--check", "--only", "llm", "--only", "stylegan")) == 0
    assert "in place" in capsys.readouterr().out

    downloaded.layout.generator_path.unlink()
    assert run_download(_parse("--models-dir", root, "--check", "--only", "stylegan")) == 1
    err = capsys.readouterr().err
    assert str(downloaded.layout.generator_path) in err
    assert f"ohlora download --models-dir {root} --only stylegan" in err


def test_check_uses_the_environment_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(hub.MODELS_DIR_ENV, str(tmp_path / "elsewhere"))

    assert run_download(_parse("--check", "--only", "sbert")) == 1
    assert str(tmp_path / "elsewhere" / "llm" / "models" / "memory_sbert") in capsys.readouterr().err


def test_command_downloads_and_prints_a_summary(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse("--models-dir", str(world.layout.root), "--only", "llm", "--only", "sbert", "--only", "stylegan")

    with world.web.client() as http:
        assert run_download(args, hub=world.hub, http=http) == 0
        first = capsys.readouterr().out
        assert run_download(args, hub=world.hub, http=http) == 0
        second = capsys.readouterr().out

    for component in HUB_COMPONENTS:
        assert component.label in first
    assert "fetched 6 files" in first  # one adapter folder
    assert "already present" not in first
    assert second.count("already present") == len(HUB_COMPONENTS)
    assert "total" in second and "fetched 0 files" in second


def test_command_reports_a_failed_download(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    del world.hub.repos[STYLEGAN_REPO]

    with world.web.client() as http:
        code = run_download(
            _parse("--models-dir", str(world.layout.root), "--only", "stylegan"), hub=world.hub, http=http
        )

    assert code == 1
    assert STYLEGAN_REPO in capsys.readouterr().err


def test_human_sizes() -> None:
    assert [hub._human_size(n) for n in (0, 999, 1000, 2_600_000_000)] == ["0 B", "999 B", "1.0 kB", "2.6 GB"]


# ---------------------------------------------------------------------------------------------
# The real pinned data
# ---------------------------------------------------------------------------------------------


def test_pinned_table_matches_the_reference_facts(reference: Path) -> None:
    facts = json.loads((reference / "vectorfind_v7" / "vectorfind_v7_facts.json").read_text(encoding="utf-8"))
    embedded = {file.relative_path: (file.sha256, file.size) for file in VECTORFIND_V7.files}

    assert embedded == {name: (entry["sha256"], entry["bytes"]) for name, entry in facts["files"].items()}


def _reference_csvs(reference: Path) -> dict[str, bytes]:
    folder = reference / "vectorfind_v7"
    return {file.relative_path: (folder / file.relative_path).read_bytes() for file in VECTORFIND_V7.files}


def test_reference_csvs_pass_the_check(reference: Path, tmp_path: Path) -> None:
    layout = ModelLayout(tmp_path)
    for relative, content in _reference_csvs(reference).items():
        _write(layout.vectorfind_dir / relative, content)

    verify_layout(layout, ["vectorfind"])

    layout.z_vectors_csv.write_bytes(layout.z_vectors_csv.read_bytes() + b"\n")
    with pytest.raises(ModelFilesMissing) as raised:
        verify_layout(layout, ["vectorfind"])
    assert raised.value.missing == (layout.z_vectors_csv,)


def test_real_data_is_fetched_from_the_pinned_commit(reference: Path, tmp_path: Path) -> None:
    served = {
        VECTORFIND_V7.url(file): content
        for file, content in zip(VECTORFIND_V7.files, _reference_csvs(reference).values(), strict=True)
    }
    web = FakeWeb(served)
    layout = ModelLayout(tmp_path)

    with web.client() as http:
        report = download_all(layout, parts=["vectorfind"], http=http, progress=False, retry=NO_WAIT)

    assert sorted(web.requests) == sorted(served)
    prefix = (
        "https://raw.githubusercontent.com/WannaBeSuperteur/AI_Projects/"
        "2cb8d2f68011974bf94fe65b15a26a73d467b44c/2025_05_02_OhLoRA_v2/stylegan/stylegan_vectorfind_v7/"
    )
    assert all(url.startswith(prefix) for url in web.requests)
    assert report.files_fetched == len(VECTORFIND_V7.files)
    verify_layout(layout, ["vectorfind"])
