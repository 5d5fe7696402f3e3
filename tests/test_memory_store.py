"""The per-user store: both implementations behave alike, and SQLite keeps its promises on disk."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import tempfile
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import aiosqlite
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    InboxEvent,
    InMemoryStore,
    NewMemory,
    SchemaTooNew,
    SqliteStore,
    Store,
    StoredMemory,
    StoreError,
    StoreUnavailable,
    TurnRecord,
    chat_scope,
    migrate,
    normalize,
    schema_version,
)
from core.types import Expression, ExpressionScores, RenderedFace, Reply, ReplyKind

ALICE = "discord:1"
BOB = "discord:2"
GROUP = "discord:guild-chat"
DIM = 8


def conversation(user_key: str, chat: str = GROUP) -> str:
    platform, user_id = user_key.split(":")
    return f"{platform}:{chat.split(':')[-1]}:{user_id}"


def embedding(seed: int, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def new_memory(key: str, value: str, seed: int = 0, text: str | None = None) -> NewMemory:
    return NewMemory(key=key, value=value, text=text or f"[{key}: {value}]", embedding=embedding(seed))


def turn(
    user_key: str = ALICE,
    *,
    chat: str = GROUP,
    prompt: str = "안녕",
    summary: str | None = None,
    scores: ExpressionScores | None = None,
    expression: Expression | None = None,
    timings: dict[str, float] | None = None,
    at: float = 1.0,
    status: str = "answer",
) -> TurnRecord:
    return TurnRecord(
        platform=user_key.split(":")[0],
        user_key=user_key,
        conversation_key=conversation(user_key, chat),
        prompt=prompt,
        final_input=prompt,
        answer=f" {prompt}에 대한 답",
        status=status,
        used_memory=None,
        expression=expression,
        scores=scores,
        summary=summary,
        timings={"total": 1.0} if timings is None else timings,
        created_at=at,
    )


def texts(memories: list[StoredMemory]) -> list[str]:
    return [memory.text for memory in memories]


@pytest.fixture(params=["sqlite", "in_memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        async with await SqliteStore.open(tmp_path / "data" / "ohlora.sqlite3") as sqlite_store:
            yield sqlite_store
    else:
        yield InMemoryStore()


# --------------------------------------------------------------------------------------------
# Behaviour shared by both implementations


async def test_a_new_store_knows_nothing(store: Store) -> None:
    assert await store.memories(ALICE) == []
    assert await store.summary(conversation(ALICE)) == ""
    assert await store.last_scores(ALICE) is None
    assert await store.recent_turns(None, 10) == []
    stats = await store.stats()
    assert (stats.turns_total, stats.users_total, stats.memories_total) == (0, 0, 0)
    assert stats.recent_latencies_s == ()


async def test_users_in_the_same_chat_never_see_each_other(store: Store) -> None:
    await store.commit_turn(
        turn(ALICE, summary="앨리스의 요약", scores=ExpressionScores(1.0, 2.0, 3.0)),
        new_memory("좋아하는 음식", "피자"),
    )

    assert await store.memories(BOB) == []
    assert await store.summary(conversation(BOB)) == ""
    assert await store.last_scores(BOB) is None
    assert await store.recent_turns(BOB, 10) == []
    assert texts(await store.memories(ALICE)) == ["[좋아하는 음식: 피자]"]
    assert await store.summary(conversation(ALICE)) == "앨리스의 요약"


async def test_the_same_memory_text_ignoring_whitespace_is_stored_once(store: Store) -> None:
    await store.commit_turn(turn(at=1.0), new_memory("오늘 날씨", "비", seed=1))
    await store.commit_turn(
        turn(at=2.0),
        new_memory("오늘날씨", "비", seed=2, text="[ 오늘날씨 :\t비 ]"),
    )

    (stored,) = await store.memories(ALICE)
    assert stored.text == "[오늘 날씨: 비]"
    assert (stored.created_at, stored.updated_at) == (1.0, 1.0)
    np.testing.assert_array_equal(stored.embedding, embedding(1))


async def test_a_new_value_for_a_known_key_replaces_it_in_place(store: Store) -> None:
    await store.commit_turn(turn(at=1.0), new_memory("좋아하는 음식", "피자", seed=1))
    await store.commit_turn(turn(at=2.0), new_memory("취미", "등산", seed=2))
    await store.commit_turn(turn(at=3.0), new_memory("좋아하는  음식", "치킨", seed=3))

    first, second = await store.memories(ALICE)
    assert (first.key, first.value, first.text) == ("좋아하는  음식", "치킨", "[좋아하는  음식: 치킨]")
    assert (first.created_at, first.updated_at) == (1.0, 3.0)
    np.testing.assert_array_equal(first.embedding, embedding(3))
    assert second.text == "[취미: 등산]"


async def test_memories_keep_insertion_order(store: Store) -> None:
    keys = ["다", "가", "나", "라"]
    for at, key in enumerate(keys):
        await store.commit_turn(turn(at=float(at)), new_memory(key, "값", seed=at))

    assert [memory.key for memory in await store.memories(ALICE)] == keys


async def test_embeddings_round_trip_exactly_as_float32(store: Store) -> None:
    vector = np.array([0.1, -0.0, 1e-45, -3.4028235e38, np.pi, 1 / 3, 7.0, -1e-7], dtype=np.float64)
    await store.commit_turn(turn(), NewMemory("k", "v", "[k: v]", vector))
    vector[:] = 0.0  # the caller's later writes must not reach the stored memory

    (stored,) = await store.memories(ALICE)
    assert stored.embedding.dtype == np.float32
    expected = np.array([0.1, -0.0, 1e-45, -3.4028235e38, np.pi, 1 / 3, 7.0, -1e-7], dtype=np.float32)
    assert stored.embedding.tobytes() == expected.tobytes()
    assert not stored.embedding.flags.writeable


async def test_an_embedding_that_is_not_one_vector_writes_nothing(store: Store) -> None:
    with pytest.raises(ValueError, match="one non-empty vector"):
        await store.commit_turn(turn(summary="요약"), NewMemory("k", "v", "[k: v]", np.zeros((1, DIM))))

    assert await store.memories(ALICE) == []
    assert await store.summary(conversation(ALICE)) == ""
    assert (await store.stats()).turns_total == 0


async def test_summary_is_kept_replaced_or_reset(store: Store) -> None:
    key = conversation(ALICE)
    await store.commit_turn(turn(summary="첫 요약"), None)
    assert await store.summary(key) == "첫 요약"

    await store.commit_turn(turn(summary=None), None)
    assert await store.summary(key) == "첫 요약"

    await store.commit_turn(turn(summary="두번째 요약"), None)
    assert await store.summary(key) == "두번째 요약"

    await store.commit_turn(turn(summary=""), None)
    assert await store.summary(key) == ""
    assert await store.clear_summaries(ALICE) == 0  # a reset summary is no summary at all


async def test_summaries_are_per_conversation(store: Store) -> None:
    await store.commit_turn(turn(chat="discord:room-a", summary="방 A"), None)
    await store.commit_turn(turn(chat="discord:room-b", summary="방 B"), None)

    assert await store.summary(conversation(ALICE, "discord:room-a")) == "방 A"
    assert await store.summary(conversation(ALICE, "discord:room-b")) == "방 B"


async def test_last_scores_follow_the_latest_answer(store: Store) -> None:
    await store.commit_turn(turn(scores=ExpressionScores(0.5, -1.0, 0.25)), None)
    await store.commit_turn(turn(scores=None), None)
    assert await store.last_scores(ALICE) == ExpressionScores(0.5, -1.0, 0.25)

    await store.commit_turn(turn(scores=ExpressionScores(-0.2, 0.0, 1.5)), None)
    assert await store.last_scores(ALICE) == ExpressionScores(-0.2, 0.0, 1.5)


async def test_a_failed_turn_writes_nothing(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    await store.commit_turn(
        turn(summary="이전 요약", scores=ExpressionScores(1.0, 1.0, 1.0), at=1.0),
        new_memory("취미", "등산", seed=1),
    )

    def broken_log(*args: object) -> None:
        raise RuntimeError("disk full")

    # The turn's log line is written last, after the memory, summary and expression.
    monkeypatch.setattr(type(store), "_log_turn", broken_log)
    with pytest.raises(RuntimeError, match="disk full"):
        await store.commit_turn(
            turn(summary="새 요약", scores=ExpressionScores(2.0, 2.0, 2.0), at=2.0),
            new_memory("취미", "낚시", seed=2),
        )
    monkeypatch.undo()

    (memory,) = await store.memories(ALICE)
    assert memory.value == "등산"
    assert await store.summary(conversation(ALICE)) == "이전 요약"
    assert await store.last_scores(ALICE) == ExpressionScores(1.0, 1.0, 1.0)
    assert (await store.stats()).turns_total == 1

    # and the store is still usable afterwards
    await store.commit_turn(turn(summary="다음 요약", at=3.0), new_memory("음식", "피자"))
    assert texts(await store.memories(ALICE)) == ["[취미: 등산]", "[음식: 피자]"]
    assert (await store.stats()).turns_total == 2


async def test_deleting_one_memory_by_key_ignores_whitespace(store: Store) -> None:
    await store.commit_turn(turn(ALICE), new_memory("좋아하는 음식", "피자"))
    await store.commit_turn(turn(ALICE), new_memory("취미", "등산"))
    await store.commit_turn(turn(BOB), new_memory("좋아하는 음식", "라면"))

    assert await store.delete_memories(ALICE, " 좋아하는음식 ") == 1
    assert await store.delete_memories(ALICE, "없는 키") == 0

    assert texts(await store.memories(ALICE)) == ["[취미: 등산]"]
    assert texts(await store.memories(BOB)) == ["[좋아하는 음식: 라면]"]


async def test_deleting_all_memories_of_a_user(store: Store) -> None:
    await store.commit_turn(turn(ALICE), new_memory("좋아하는 음식", "피자"))
    await store.commit_turn(turn(ALICE), new_memory("취미", "등산"))
    await store.commit_turn(turn(BOB), new_memory("취미", "독서"))

    assert await store.delete_memories(ALICE) == 2
    assert await store.delete_memories(ALICE) == 0

    assert await store.memories(ALICE) == []
    assert texts(await store.memories(BOB)) == ["[취미: 독서]"]


async def test_clearing_summaries(store: Store) -> None:
    room_a, room_b = "discord:room-a", "discord:room-b"
    await store.commit_turn(turn(ALICE, chat=room_a, summary="A1"), None)
    await store.commit_turn(turn(ALICE, chat=room_b, summary="A2"), None)
    await store.commit_turn(turn(BOB, chat=room_a, summary="B1"), None)

    # someone else's conversation is not cleared through this user
    assert await store.clear_summaries(ALICE, conversation(BOB, room_a)) == 0
    assert await store.clear_summaries(ALICE, conversation(ALICE, room_a)) == 1
    assert await store.summary(conversation(ALICE, room_a)) == ""
    assert await store.summary(conversation(ALICE, room_b)) == "A2"

    assert await store.clear_summaries(ALICE) == 1
    assert await store.summary(conversation(ALICE, room_b)) == ""
    assert await store.summary(conversation(BOB, room_a)) == "B1"


async def test_forget_user_removes_everything_the_user_left(store: Store) -> None:
    for user in (ALICE, BOB):
        await store.commit_turn(
            turn(user, summary="요약", scores=ExpressionScores(1.0, 1.0, 1.0)),
            new_memory("취미", "등산"),
        )
    await store.set_blocked(ALICE, True)

    await store.forget_user(ALICE)

    assert await store.memories(ALICE) == []
    assert await store.summary(conversation(ALICE)) == ""
    assert await store.last_scores(ALICE) is None
    assert await store.recent_turns(ALICE, 10) == []
    assert await store.is_blocked(ALICE)  # moderation, not the user's data
    assert texts(await store.memories(BOB)) == ["[취미: 등산]"]
    assert await store.summary(conversation(BOB)) == "요약"
    assert [row.user_key for row in await store.recent_turns(None, 10)] == [BOB]


async def test_settings_are_scoped_key_values(store: Store) -> None:
    assert await store.get_setting("discord:guild:1", "face") is None
    await store.set_setting("discord:guild:1", "b", "2")
    await store.set_setting("discord:guild:1", "a", "1")
    await store.set_setting("discord:guild:2", "a", "other")
    await store.set_setting("discord:guild:1", "a", "3")

    assert await store.get_setting("discord:guild:1", "a") == "3"
    assert await store.settings("discord:guild:1") == {"a": "3", "b": "2"}

    await store.delete_setting("discord:guild:1", "a")
    await store.delete_setting("discord:guild:1", "never set")
    assert await store.settings("discord:guild:1") == {"b": "2"}
    assert await store.settings("discord:guild:2") == {"a": "other"}


async def test_face_per_scope(store: Store) -> None:
    assert await store.face_for("telegram:chat:5") is None
    await store.set_face("telegram:chat:5", 127)
    await store.set_face("telegram:chat:6", 2240)

    assert await store.face_for("telegram:chat:5") == 127
    assert await store.face_for("telegram:chat:6") == 2240

    await store.set_face("telegram:chat:5", None)
    assert await store.face_for("telegram:chat:5") is None
    assert await store.face_for("telegram:chat:6") == 2240


async def test_blocking_users(store: Store) -> None:
    await store.set_blocked(BOB, True)
    await store.set_blocked(ALICE, True)
    await store.set_blocked(ALICE, True)

    assert await store.is_blocked(ALICE)
    assert await store.blocked_users() == [ALICE, BOB]

    await store.set_blocked(ALICE, False)
    await store.set_blocked("telegram:9", False)
    assert not await store.is_blocked(ALICE)
    assert await store.blocked_users() == [BOB]


async def test_channel_allowlists_are_per_platform(store: Store) -> None:
    await store.set_channel_allowed("discord", "100", True)
    await store.set_channel_allowed("discord", "200", True)

    assert await store.is_channel_allowed("discord", "100")
    assert not await store.is_channel_allowed("telegram", "100")
    assert await store.allowed_channels("discord") == ["100", "200"]
    assert await store.allowed_channels("telegram") == []

    await store.set_channel_allowed("discord", "100", False)
    assert not await store.is_channel_allowed("discord", "100")
    assert await store.allowed_channels("discord") == ["200"]


async def test_stats_count_and_keep_recent_latencies_in_order(store: Store) -> None:
    for at, (user, total) in enumerate([(ALICE, 3.0), (BOB, 1.5), (ALICE, 2.25), (BOB, 4.0)]):
        await store.commit_turn(turn(user, timings={"total": total}, at=float(at)), None)
    await store.commit_turn(turn(ALICE), new_memory("취미", "등산"))
    await store.commit_turn(turn(BOB), new_memory("취미", "독서"))
    await store.commit_turn(turn(BOB), new_memory("음식", "라면"))

    stats = await store.stats(window=4)
    assert (stats.turns_total, stats.users_total, stats.memories_total) == (7, 2, 3)
    assert stats.recent_latencies_s == (4.0, 1.0, 1.0, 1.0)
    assert (await store.stats()).recent_latencies_s == (3.0, 1.5, 2.25, 4.0, 1.0, 1.0, 1.0)
    assert (await store.stats(window=0)).recent_latencies_s == ()


async def test_turn_time_falls_back_to_the_sum_of_its_stages(store: Store) -> None:
    await store.commit_turn(turn(timings={"llm": 1.25, "face": 0.5}), None)

    (row,) = await store.recent_turns(ALICE, 1)
    assert row.total_s == 1.75
    assert row.timings == {"llm": 1.25, "face": 0.5}


async def test_recent_turns_newest_first(store: Store) -> None:
    await store.commit_turn(turn(ALICE, prompt="하나", at=1.0), None)
    await store.commit_turn(turn(BOB, prompt="둘", at=2.0, expression=Expression("보통", "크게", "없음")), None)
    await store.commit_turn(turn(ALICE, prompt="셋", at=3.0, status="error"), None)

    everyone = await store.recent_turns(None, 10)
    assert [row.prompt for row in everyone] == ["셋", "둘", "하나"]
    assert [row.prompt for row in await store.recent_turns(ALICE, 10)] == ["셋", "하나"]
    assert [row.prompt for row in await store.recent_turns(None, 2)] == ["셋", "둘"]
    assert await store.recent_turns(None, 0) == []

    newest, middle, oldest = everyone
    assert newest.status == "error" and newest.created_at == 3.0
    assert middle.expression == Expression("보통", "크게", "없음")
    assert oldest.expression is None
    assert (middle.platform, middle.user_key, middle.conversation_key) == (
        "discord",
        BOB,
        conversation(BOB),
    )
    assert middle.answer == " 둘에 대한 답"
    assert oldest.id < middle.id < newest.id


async def test_concurrent_turns_all_land(store: Store) -> None:
    users = [f"telegram:{n}" for n in range(5)]

    async def one_turn(n: int) -> None:
        user = users[n % len(users)]
        await store.commit_turn(
            turn(user, prompt=f"질문 {n}", summary=f"요약 {n}", at=float(n)),
            new_memory(f"키 {n}", f"값 {n}", seed=n),
        )

    await asyncio.gather(*(one_turn(n) for n in range(50)))

    stats = await store.stats()
    assert (stats.turns_total, stats.users_total, stats.memories_total) == (50, 5, 50)
    for index, user in enumerate(users):
        memories = await store.memories(user)
        assert sorted(memory.key for memory in memories) == sorted(f"키 {n}" for n in range(index, 50, len(users)))
        for memory in memories:
            n = int(memory.key.split()[1])
            np.testing.assert_array_equal(memory.embedding, embedding(n))


# --------------------------------------------------------------------------------------------
# Both implementations agree on any sequence of memory writes


memory_writes = st.lists(
    st.tuples(
        st.sampled_from(["날씨", "날 씨", "음식", "취미"]),
        st.sampled_from(["비", "맑 음", "맑음", "피자"]),
        st.sampled_from(["", " ", "  "]),
        st.booleans(),
    ),
    max_size=12,
)


@settings(max_examples=40, deadline=None)
@given(writes=memory_writes)
async def test_both_stores_agree_on_memory_writes(
    writes: list[tuple[str, str, str, bool]],
) -> None:
    reference = InMemoryStore()
    with tempfile.TemporaryDirectory() as folder:
        async with await SqliteStore.open(Path(folder) / "db.sqlite3") as sqlite_store:
            for at, (key, value, padding, delete) in enumerate(writes):
                for store in (reference, sqlite_store):
                    if delete:
                        await store.delete_memories(ALICE, padding + key)
                    else:
                        memory = new_memory(key, value, seed=at, text=f"[{key}:{padding}{value}]")
                        await store.commit_turn(turn(at=float(at)), memory)

            expected = await reference.memories(ALICE)
            actual = await sqlite_store.memories(ALICE)

    assert actual == expected  # embeddings aside: dataclass equality skips them
    for mine, theirs in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(mine.embedding, theirs.embedding)
    assert len({normalize(memory.key) for memory in actual}) == len(actual)
    assert len({normalize(memory.text) for memory in actual}) == len(actual)


# --------------------------------------------------------------------------------------------
# SQLite only


async def test_everything_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "folders" / "ohlora.sqlite3"
    async with await SqliteStore.open(path) as store:
        await store.commit_turn(
            turn(summary="요약", scores=ExpressionScores(0.1, 0.2, 0.3)),
            new_memory("취미", "등산", seed=7),
        )
        await store.set_face("discord:guild:1", 127)
        await store.set_blocked(BOB, True)

    async with await SqliteStore.open(path) as store:
        (memory,) = await store.memories(ALICE)
        assert memory.text == "[취미: 등산]"
        np.testing.assert_array_equal(memory.embedding, embedding(7))
        assert await store.summary(conversation(ALICE)) == "요약"
        assert await store.last_scores(ALICE) == ExpressionScores(0.1, 0.2, 0.3)
        assert await store.face_for("discord:guild:1") == 127
        assert await store.blocked_users() == [BOB]
        assert [row.prompt for row in await store.recent_turns(ALICE, 5)] == ["안녕"]


def read_pragma(path: Path, name: str) -> object:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]


def table_names(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {row[0] for row in rows}


TABLES = {"memories", "summaries", "expressions", "turns", "settings"}


async def test_an_empty_file_is_migrated_to_the_latest_schema(tmp_path: Path) -> None:
    path = tmp_path / "empty.sqlite3"
    path.touch()

    async with await SqliteStore.open(path) as store:
        await store.commit_turn(turn(), new_memory("취미", "등산"))

    assert read_pragma(path, "user_version") == SCHEMA_VERSION
    assert TABLES <= table_names(path)


async def test_the_database_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "ohlora.sqlite3"
    async with await SqliteStore.open(path):
        assert read_pragma(path, "journal_mode") == "wal"


async def test_reopening_does_not_migrate_again(tmp_path: Path) -> None:
    path = tmp_path / "ohlora.sqlite3"
    async with await SqliteStore.open(path) as store:
        await store.set_setting("scope", "key", "value")
    async with await SqliteStore.open(path) as store:
        assert await store.get_setting("scope", "key") == "value"
    assert read_pragma(path, "user_version") == SCHEMA_VERSION


async def test_a_file_from_a_newer_version_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "future.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE from_the_future (x)")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()

    with pytest.raises(SchemaTooNew, match=f"version {SCHEMA_VERSION + 1}") as refused:
        store = await SqliteStore.open(path)
        await store.close()  # reached only when the refusal is missing

    assert isinstance(refused.value, StoreError)
    assert read_pragma(path, "user_version") == SCHEMA_VERSION + 1
    assert table_names(path) == {"from_the_future"}


async def test_migrations_apply_only_the_missing_steps(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    steps = [
        ("CREATE TABLE notes (text TEXT)", "INSERT INTO notes VALUES ('from v1')"),
        ("ALTER TABLE notes ADD COLUMN stars INTEGER NOT NULL DEFAULT 0",),
        ("UPDATE notes SET stars = 5",),
    ]
    async with aiosqlite.connect(path, isolation_level=None) as conn:
        assert await migrate(conn, steps[:1]) == 1
        await conn.execute("INSERT INTO notes VALUES ('written at v1')")
        assert await migrate(conn, steps) == 3
        assert await schema_version(conn) == 3
        rows = await conn.execute_fetchall("SELECT text, stars FROM notes ORDER BY rowid")
    assert [tuple(row) for row in rows] == [("from v1", 5), ("written at v1", 5)]


async def test_a_failing_migration_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    good = ("CREATE TABLE notes (text TEXT)",)
    bad = ("ALTER TABLE notes ADD COLUMN stars INTEGER", "INSERT INTO missing_table VALUES (1)")
    async with aiosqlite.connect(path, isolation_level=None) as conn:
        await migrate(conn, [good])
        with pytest.raises(sqlite3.OperationalError, match="missing_table"):
            await migrate(conn, [good, bad])
        assert await schema_version(conn) == 1
        columns = await conn.execute_fetchall("PRAGMA table_info(notes)")
    assert [row[1] for row in columns] == ["text"]


async def test_two_processes_writing_the_same_file_both_land(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    async with await SqliteStore.open(path) as first, await SqliteStore.open(path) as second:

        async def write(store: SqliteStore, n: int) -> None:
            await store.commit_turn(turn(f"telegram:{n}", at=float(n)), new_memory("번호", str(n), seed=n))

        await asyncio.gather(*(write((first, second)[n % 2], n) for n in range(20)))

        stats = await first.stats()
    assert (stats.turns_total, stats.users_total, stats.memories_total) == (20, 20, 20)


# --------------------------------------------------------------------------------------------
# The inbox: every event kept from arrival until delivered, on both implementations alike

TG_ALICE = "telegram:1"
TG_BOB = "telegram:2"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))
"""An image's bytes with NULs and every byte value: a BLOB must not be read back as text."""


def event(
    event_id: str, user_key: str = TG_ALICE, *, at: float = 1.0, payload: str | None = None, platform: str | None = None
) -> InboxEvent:
    return InboxEvent(
        platform=platform or user_key.split(":")[0],
        event_id=event_id,
        user_key=user_key,
        payload=payload if payload is not None else f'{{"text": "{event_id}번 메시지"}}',
        received_at=at,
    )


def picture_reply(text: str = "안녕! 😊\n두 번째 줄", kind: ReplyKind = ReplyKind.ANSWER) -> Reply:
    return Reply(text=text, kind=kind, image=RenderedFace(data=PNG, mime_type="image/png", face=127))


def delivered(reply: Reply | None) -> tuple[str, ReplyKind, RenderedFace | None] | None:
    """What a restart sends: the text, its kind and the picture; the rest of a Reply is not kept."""
    return None if reply is None else (reply.text, reply.kind, reply.image)


def answered_turn(event_id: str, reply: Reply, user_key: str = TG_ALICE, summary: str | None = None) -> TurnRecord:
    return dataclasses.replace(turn(user_key, chat="telegram:-100", summary=summary), event_id=event_id, reply=reply)


async def pending_ids(store: Store, platform: str = "telegram") -> list[str]:
    return [pending.event.event_id for pending in await store.pending_events(platform)]


async def test_a_duplicate_event_is_refused_and_changes_nothing(store: Store) -> None:
    """Telegram and Discord redeliver: the second copy of an id must not be handled or overwrite the first."""
    assert await store.receive_events([event("1", payload='{"n": 1}', at=1.0)]) == [True]
    await store.answer_event("telegram", "1", picture_reply())

    again = [event("1", TG_BOB, payload='{"n": 2}', at=5.0), event("2", at=5.0), event("2", at=6.0)]
    assert await store.receive_events(again) == [False, True, False]
    assert await store.receive_events([event("1", platform="discord")]) == [True], "ids are per platform"

    first, second = await store.pending_events("telegram")
    assert first.event == event("1", payload='{"n": 1}', at=1.0)
    assert delivered(first.reply) == delivered(picture_reply()), "a duplicate must not reset the kept reply"
    assert second.event == event("2", at=5.0) and second.reply is None


async def test_a_kept_reply_round_trips_exactly(store: Store) -> None:
    """A restart delivers what was computed before it: text, kind and picture byte for byte."""
    await store.receive_events([event("1"), event("2"), event("3")])
    await store.answer_event("telegram", "1", picture_reply())
    await store.answer_event("telegram", "2", Reply(text="잠깐만 천천히!", kind=ReplyKind.NOTICE))

    one, two, three = await store.pending_events("telegram")
    assert delivered(one.reply) == ("안녕! 😊\n두 번째 줄", ReplyKind.ANSWER, RenderedFace(PNG, "image/png", 127))
    assert one.reply is not None and one.reply.image is not None and one.reply.image.data == PNG
    assert delivered(two.reply) == ("잠깐만 천천히!", ReplyKind.NOTICE, None)
    assert three.reply is None, "an event not yet answered has no reply"


async def test_a_turn_keeps_its_reply_with_its_event(store: Store) -> None:
    """The answer is kept by the turn's own write, so a crash right after it still delivers it."""
    await store.receive_events([event("7"), event("8")])

    await store.commit_turn(answered_turn("7", picture_reply()), new_memory("취미", "등산"))

    seven, eight = await store.pending_events("telegram")
    assert delivered(seven.reply) == delivered(picture_reply())
    assert eight.reply is None, "only the turn's own event is answered"
    assert (await store.stats()).turns_total == 1


async def test_finished_events_lose_payload_and_reply_but_stay_duplicates(store: Store) -> None:
    """Nothing the user wrote outlives the delivery, yet a late copy of the event is still recognised."""
    await store.receive_events([event("1"), event("2"), event("3")])
    await store.answer_event("telegram", "1", picture_reply())

    await store.finish_events("telegram", ["1", "2", "unknown"])
    await store.answer_event("telegram", "1", picture_reply("늦은 답"))  # a done event stays done
    await store.commit_turn(answered_turn("2", picture_reply("늦은 턴")), None)

    assert await pending_ids(store) == ["3"]
    assert await store.receive_events([event("1"), event("2"), event("3")]) == [False, False, False]
    assert await pending_ids(store) == ["3"]


async def test_pending_events_are_oldest_first_and_per_platform(store: Store) -> None:
    """A restart answers in the order users wrote; one batch shares its arrival time and keeps its order."""
    await store.receive_events([event("late", at=3.0), event("early", at=1.0)])
    await store.receive_events([event(name, at=2.0) for name in ("b", "a", "c")])
    await store.receive_events([event("100", "discord:1", at=0.5)])

    assert await pending_ids(store) == ["early", "b", "a", "c", "late"]
    assert await pending_ids(store, "discord") == ["100"]
    assert await pending_ids(store, "console") == []


async def test_prune_removes_only_done_events_older_than_the_cutoff(store: Store) -> None:
    """Old ids can go (no duplicate comes that late); unanswered events and recent ids must stay."""
    await store.receive_events([event("old-done", at=1.0), event("cutoff-done", at=10.0), event("new-done", at=20.0)])
    await store.receive_events([event("old-pending", at=1.0), event("9", "discord:1", at=1.0)])
    await store.finish_events("telegram", ["old-done", "cutoff-done", "new-done"])
    await store.finish_events("discord", ["9"])

    assert await store.prune_events("telegram", received_before=10.0) == 1
    assert await store.prune_events("telegram", received_before=10.0) == 0

    assert await pending_ids(store) == ["old-pending"]
    fresh = await store.receive_events(
        [event("old-done"), event("cutoff-done"), event("new-done"), event("9", "discord:1")]
    )
    assert fresh == [True, False, False, False], "only the pruned id is new again"


async def test_move_chat_takes_summaries_face_and_channel_and_nothing_else(store: Store) -> None:
    """A group that became a supergroup keeps everything of its own; other chats and platforms keep theirs."""
    old, new, lookalike = "-100", "-1009", "-1001"
    for user in (TG_ALICE, TG_BOB):
        await store.commit_turn(turn(user, chat=f"telegram:{old}", summary=f"{user} 요약"), None)
    await store.commit_turn(turn(TG_ALICE, chat=f"telegram:{lookalike}", summary="다른 방"), None)
    await store.commit_turn(turn("discord:1", chat=f"discord:{old}", summary="디스코드"), None)
    for platform, chat, face in (("telegram", old, 127), ("telegram", lookalike, 931), ("discord", old, 1277)):
        await store.set_face(chat_scope(platform, chat), face)
        await store.set_channel_allowed(platform, chat, True)

    await store.move_chat("telegram", old, new)

    for user in (TG_ALICE, TG_BOB):
        assert await store.summary(conversation(user, f"telegram:{new}")) == f"{user} 요약"
        assert await store.summary(conversation(user, f"telegram:{old}")) == ""
    assert await store.summary(conversation(TG_ALICE, f"telegram:{lookalike}")) == "다른 방"
    assert await store.summary(conversation("discord:1", f"discord:{old}")) == "디스코드"
    assert await store.face_for(chat_scope("telegram", new)) == 127
    assert await store.face_for(chat_scope("telegram", old)) is None
    assert await store.face_for(chat_scope("telegram", lookalike)) == 931
    assert await store.face_for(chat_scope("discord", old)) == 1277
    assert await store.allowed_channels("telegram") == [lookalike, new]
    assert await store.allowed_channels("discord") == [old]
    # the moved summary is still its user's: /reset and forget reach it
    assert await store.clear_summaries(TG_ALICE, conversation(TG_ALICE, f"telegram:{new}")) == 1


async def test_a_failed_commit_leaves_the_inbox_row_as_it_was(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """An event is answered only together with its turn: a failed write must not mark it answered."""
    await store.receive_events([event("1")])

    def broken_log(*args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(store), "_log_turn", broken_log)
    with pytest.raises(RuntimeError, match="disk full"):
        await store.commit_turn(answered_turn("1", picture_reply()), None)
    monkeypatch.undo()

    (pending,) = await store.pending_events("telegram")
    assert pending.event == event("1") and pending.reply is None
    assert (await store.stats()).turns_total == 0


async def test_forget_user_redacts_only_that_users_inbox_rows(store: Store) -> None:
    """Forgetting a user removes what they wrote from the inbox too; other users' deliveries go on."""
    await store.receive_events([event("1", TG_ALICE), event("2", TG_BOB), event("3", TG_ALICE)])
    await store.answer_event("telegram", "1", picture_reply("앨리스에게"))
    await store.answer_event("telegram", "2", picture_reply("밥에게"))

    await store.forget_user(TG_ALICE)

    (bob,) = await store.pending_events("telegram")
    assert bob.event == event("2", TG_BOB)
    assert delivered(bob.reply) == delivered(picture_reply("밥에게"))
    assert await store.receive_events([event("1", TG_ALICE), event("3", TG_ALICE)]) == [False, False]


# SQLite only: what is on disk, transactions, migrations, unusable paths


def inbox_rows(path: Path) -> dict[str, tuple[object, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute(
            "SELECT event_id, state, payload, reply_text, reply_kind, image, image_mime, image_face FROM inbox"
        ).fetchall()
    return {row[0]: tuple(row[1:]) for row in rows}


async def test_finishing_and_forgetting_leave_no_user_text_in_the_file(tmp_path: Path) -> None:
    """The promise is about the file on disk, not only what the store hands out."""
    path = tmp_path / "ohlora.sqlite3"
    async with await SqliteStore.open(path) as store:
        await store.receive_events([event("1", TG_ALICE), event("2", TG_ALICE), event("3", TG_BOB)])
        await store.answer_event("telegram", "1", picture_reply("비밀 답"))
        await store.answer_event("telegram", "3", picture_reply("밥의 답"))
        await store.finish_events("telegram", ["1"])
        await store.forget_user(TG_ALICE)

        rows = inbox_rows(path)
    gone = ("done", None, None, None, None, None, None)
    assert rows["1"] == gone and rows["2"] == gone
    assert rows["3"][:2] == ("answered", event("3", TG_BOB).payload)
    assert rows["3"][2:] == ("밥의 답", "answer", PNG, "image/png", 127)


async def test_sqlite_answers_the_event_only_together_with_the_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after the answer is written rolls back the answer with the turn: one transaction."""
    import core.store.sqlite as sqlite_module

    real_answer = sqlite_module._answer_event

    async def answer_then_fail(conn: aiosqlite.Connection, platform: str, event_id: str, reply: Reply) -> None:
        await real_answer(conn, platform, event_id, reply)
        raise sqlite3.OperationalError("disk I/O error")

    async with await SqliteStore.open(tmp_path / "ohlora.sqlite3") as store:
        await store.receive_events([event("1")])
        monkeypatch.setattr(sqlite_module, "_answer_event", answer_then_fail)
        with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
            await store.commit_turn(answered_turn("1", picture_reply(), summary="요약"), new_memory("취미", "등산"))
        monkeypatch.undo()

        (pending,) = await store.pending_events("telegram")
        assert pending.reply is None
        assert (await store.stats()).turns_total == 0
        assert await store.memories(TG_ALICE) == []
        assert await store.summary(conversation(TG_ALICE, "telegram:-100")) == ""


async def test_a_version_1_database_keeps_its_data_when_migrated_to_version_2(tmp_path: Path) -> None:
    """A deployment upgrading to the inbox must not lose its users' memories, summaries and settings."""
    path = tmp_path / "v1.sqlite3"
    conn = await aiosqlite.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    assert await migrate(conn, MIGRATIONS[:1]) == 1
    async with SqliteStore(conn) as v1:
        await v1.commit_turn(
            turn(summary="옛 요약", scores=ExpressionScores(0.1, 0.2, 0.3)), new_memory("취미", "등산")
        )
        await v1.set_face(chat_scope("discord", "guild"), 127)
        await v1.set_blocked(BOB, True)
    assert "inbox" not in table_names(path)

    async with await SqliteStore.open(path) as store:
        assert texts(await store.memories(ALICE)) == ["[취미: 등산]"]
        assert await store.summary(conversation(ALICE)) == "옛 요약"
        assert await store.last_scores(ALICE) == ExpressionScores(0.1, 0.2, 0.3)
        assert await store.face_for(chat_scope("discord", "guild")) == 127
        assert await store.blocked_users() == [BOB]
        assert [row.prompt for row in await store.recent_turns(ALICE, 5)] == ["안녕"]
        assert await store.receive_events([event("1")]) == [True]
    assert read_pragma(path, "user_version") == SCHEMA_VERSION == 2


def assert_names_path_and_fix(error: StoreUnavailable, path: Path) -> None:
    assert str(path) in str(error)
    assert "OHLORA_DB_PATH" in str(error) and "--db" in str(error)
    assert isinstance(error, StoreError)


async def test_a_folder_is_no_database(tmp_path: Path) -> None:
    """Pointing OHLORA_DB_PATH at a folder is a plain error naming it, not a traceback from SQLite."""
    with pytest.raises(StoreUnavailable) as refused:
        store = await SqliteStore.open(tmp_path)
        await store.close()  # reached only when the refusal is missing

    assert_names_path_and_fix(refused.value, tmp_path)


async def test_a_path_under_a_regular_file_is_no_database(tmp_path: Path) -> None:
    """A parent that is a file cannot become a folder; this holds for root too."""
    (tmp_path / "not-a-folder").write_text("x")
    path = tmp_path / "not-a-folder" / "ohlora.sqlite3"

    with pytest.raises(StoreUnavailable) as refused:
        store = await SqliteStore.open(path)
        await store.close()

    assert_names_path_and_fix(refused.value, path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions, so a read-only folder is writable")
async def test_a_read_only_folder_is_no_database(tmp_path: Path) -> None:
    """The deployment mistake the issue met: a database path the service user cannot write."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(StoreUnavailable) as refused:
            store = await SqliteStore.open(folder / "ohlora.sqlite3")
            await store.close()
    finally:
        folder.chmod(0o700)

    assert_names_path_and_fix(refused.value, folder / "ohlora.sqlite3")


async def test_a_path_that_cannot_be_opened_starts_no_aiosqlite_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiosqlite's failed connect leaves its thread to answer a loop that `asyncio.run` may have closed,
    which printed a traceback after the start-up error; the path is tried plainly first instead."""
    started: list[object] = []
    real_connect = aiosqlite.connect

    def recording_connect(*args: Any, **kwargs: Any) -> aiosqlite.Connection:
        started.append(args)
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(aiosqlite, "connect", recording_connect)
    with pytest.raises(StoreUnavailable):
        store = await SqliteStore.open(tmp_path)
        await store.close()

    assert started == []
    async with await SqliteStore.open(tmp_path / "fine.sqlite3"):
        assert len(started) == 1, "a usable path still opens through aiosqlite"
