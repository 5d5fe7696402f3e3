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

from bot.commands import BLOCK_NOTIFIED
from core.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Footprint,
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
from core.store.values import BLOCKED_SCOPE
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

    gone = await store.forget_user(ALICE)

    assert gone == Footprint(memories=1, summaries=1, turns=1, expression=True)
    assert await store.memories(ALICE) == []
    assert await store.summary(conversation(ALICE)) == ""
    assert await store.last_scores(ALICE) is None
    assert await store.recent_turns(ALICE, 10) == []
    assert await store.footprint(ALICE) == Footprint(memories=0, summaries=0, turns=0, expression=False)
    assert await store.is_blocked(ALICE)  # moderation, not the user's data
    assert texts(await store.memories(BOB)) == ["[취미: 등산]"]
    assert await store.summary(conversation(BOB)) == "요약"
    # The forgotten turn stays for the statistics, with nothing left that was said or who said it.
    bobs, forgotten = sorted(await store.recent_turns(None, 10), key=lambda row: row.user_key)
    assert bobs.user_key == BOB and bobs.prompt == "안녕"
    assert forgotten.user_key.startswith("forgotten:") and forgotten.conversation_key == forgotten.user_key
    assert (forgotten.prompt, forgotten.final_input, forgotten.answer, forgotten.used_memory) == ("", "", "", None)
    assert (await store.stats()).turns_total == 2 and (await store.stats()).users_total == 2


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


# --------------------------------------------------------------------------------------------
# A user's data: what forgetting takes, what an export shows, how long the turn log keeps it

ROOM = "discord:room-b"
LOOKALIKE = "discord:10"
"""A key that begins with Alice's (`discord:1`): a prefix match would hand her this user's data."""
FORGOTTEN_PREFIX = "forgotten:"


async def leave_a_trace(store: Store, user: str, words: str, *, at: float = 1.0, score: float = 0.1) -> None:
    """Two turns: one in the shared group chat and one in another room, each with a memory and a summary."""
    await store.commit_turn(
        turn(
            user,
            prompt=f"{words} 하나",
            summary=f"{words} 요약",
            scores=ExpressionScores(score, 0.2, 0.3),
            expression=Expression("보통", "크게", "없음"),
            at=at,
        ),
        new_memory("취미", words),
    )
    await store.commit_turn(
        turn(user, chat=ROOM, prompt=f"{words} 둘", summary=f"{words} 방 요약", at=at + 1),
        new_memory("음식", f"{words} 음식"),
    )


NOTHING = Footprint(memories=0, summaries=0, turns=0, expression=False)


async def test_footprint_counts_only_what_the_user_left(store: Store) -> None:
    """The `/forget` confirmation shows these counts: they must be the user's own, nobody else's."""
    await leave_a_trace(store, ALICE, "앨리스")
    await store.commit_turn(turn(ALICE, at=3.0), None)  # a turn that leaves no summary or memory
    await leave_a_trace(store, BOB, "밥")
    await store.set_blocked(ALICE, True)  # a block is no data of hers to count

    assert await store.footprint(ALICE) == Footprint(memories=2, summaries=2, turns=3, expression=True)
    assert await store.footprint(BOB) == Footprint(memories=2, summaries=2, turns=2, expression=True)
    assert await store.footprint(LOOKALIKE) == NOTHING and NOTHING.empty
    assert not Footprint(memories=0, summaries=0, turns=0, expression=True).empty, "a face alone is data too"


async def test_forgetting_takes_every_conversation_and_leaves_everyone_else_as_they_were(store: Store) -> None:
    """Summaries of every chat go, not only the current one; others' data, and her block, stay exactly."""
    await leave_a_trace(store, ALICE, "앨리스", score=0.1)
    await leave_a_trace(store, BOB, "밥", at=10.0, score=0.5)
    await leave_a_trace(store, LOOKALIKE, "닮은꼴", at=20.0, score=0.9)
    await store.set_blocked(ALICE, True)
    others = {user: await store.user_data(user) for user in (BOB, LOOKALIKE)}
    before = await store.stats()

    gone = await store.forget_user(ALICE)

    assert gone == Footprint(memories=2, summaries=2, turns=2, expression=True)
    assert await store.footprint(ALICE) == NOTHING
    assert await store.summary(conversation(ALICE)) == "" and await store.summary(conversation(ALICE, ROOM)) == ""
    assert await store.memories(ALICE) == [] and await store.last_scores(ALICE) is None
    assert await store.is_blocked(ALICE), "a block is moderation, not her data: she cannot lift it this way"
    for user, theirs in others.items():
        assert await store.user_data(user) == theirs, f"{user} lost or changed something"
    after = await store.stats()
    assert (after.turns_total, after.users_total, after.memories_total) == (6, 3, 4)
    assert after.recent_latencies_s == before.recent_latencies_s
    assert await store.forget_user(ALICE) == NOTHING, "forgetting twice finds nothing the second time"


async def test_forgotten_turns_keep_their_timings_but_lose_their_words_and_their_owner(store: Store) -> None:
    """Admins' statistics still add up; nothing said, nor who said it, can be read from the log."""
    secret = dataclasses.replace(
        turn(ALICE, prompt="비밀 하나", timings={"llm": 1.25, "total": 2.5}, at=1.0, status="ok"),
        final_input="(오로라 답변 요약) 비밀 요약 (사용자 질문) 비밀 하나",
        used_memory="[비밀: 사과]",
        expression=Expression("감음", "작게", "많이"),
    )
    await store.commit_turn(secret, new_memory("비밀", "사과"))
    await store.commit_turn(
        turn(ALICE, chat=ROOM, prompt="비밀 둘", timings={"total": 4.0}, at=2.0, status="timeout"), None
    )
    await store.commit_turn(turn(BOB, prompt="밥의 말", at=3.0), None)
    before = {row.id: row for row in await store.recent_turns(None, 10)}

    await store.forget_user(ALICE)

    after = {row.id: row for row in await store.recent_turns(None, 10)}
    assert after.keys() == before.keys(), "redacted, not deleted: the turns still count"
    pseudonyms = set()
    for row_id, row in after.items():
        old = before[row_id]
        if old.user_key != ALICE:
            assert row == old
            continue
        assert (row.created_at, row.platform, row.status, row.timings, row.total_s) == (
            old.created_at,
            old.platform,
            old.status,
            old.timings,
            old.total_s,
        )
        assert (row.prompt, row.final_input, row.answer, row.used_memory, row.expression) == ("", "", "", None, None)
        assert row.user_key.startswith(FORGOTTEN_PREFIX) and row.conversation_key == row.user_key
        assert ALICE not in row.user_key
        pseudonyms.add(row.user_key)
    assert len(pseudonyms) == 1, "one pseudonym for all her turns, so she still counts as one user"


async def test_two_forgotten_users_stay_two_users_and_a_returning_user_starts_afresh(store: Store) -> None:
    """Each forget draws its own pseudonym: `users_total` must not shrink because two people left."""
    for user in (ALICE, BOB, TG_ALICE):
        await store.commit_turn(turn(user), None)

    await store.forget_user(ALICE)
    await store.forget_user(BOB)

    keys = {row.user_key for row in await store.recent_turns(None, 10)}
    assert len(keys) == 3 and TG_ALICE in keys
    assert sum(key.startswith(FORGOTTEN_PREFIX) for key in keys) == 2
    stats = await store.stats()
    assert (stats.turns_total, stats.users_total) == (3, 3)

    await store.commit_turn(turn(ALICE, prompt="다시 왔어", at=5.0), None)
    assert [row.prompt for row in await store.recent_turns(ALICE, 10)] == ["다시 왔어"]
    assert await store.footprint(ALICE) == Footprint(memories=0, summaries=0, turns=1, expression=False)
    assert (await store.stats()).users_total == 4, "her new turns are not joined to the forgotten ones"


async def test_user_data_is_exactly_the_users_own(store: Store) -> None:
    """`/mydata` hands this out: all of hers, in order, and never a word of Bob's from the same group chat."""
    await leave_a_trace(store, ALICE, "앨리스", at=1.0, score=0.1)
    await leave_a_trace(store, BOB, "밥", at=10.0, score=0.5)
    await leave_a_trace(store, LOOKALIKE, "닮은꼴", at=20.0, score=0.9)
    await store.commit_turn(turn(ALICE, prompt="앨리스 셋", at=30.0), None)
    for user in (ALICE, BOB, LOOKALIKE):
        await store.set_blocked(user, True)
        await store.set_setting(user, BLOCK_NOTIFIED, "1")
    await store.set_face(chat_scope("discord", "guild-chat"), 127)  # the chat's setting, not hers
    await store.receive_events(
        [
            InboxEvent("discord", "late", ALICE, '{"text": "늦게 온 말"}', 5.0),
            InboxEvent("discord", "early", ALICE, '{"text": "먼저 온 말"}', 2.0),
            InboxEvent("discord", "delivered", ALICE, '{"text": "이미 답한 말"}', 1.0),
            InboxEvent("discord", "bobs", BOB, '{"text": "밥이 보낸 말"}', 1.5),
        ]
    )
    await store.answer_event("discord", "late", Reply(text="답", kind=ReplyKind.ANSWER))  # answered, not delivered
    await store.finish_events("discord", ["delivered"])

    data = await store.user_data(ALICE)

    assert data.user_key == ALICE
    assert list(data.memories) == await store.memories(ALICE)
    assert texts(list(data.memories)) == ["[취미: 앨리스]", "[음식: 앨리스 음식]"]
    assert dict(data.summaries) == {conversation(ALICE): "앨리스 요약", conversation(ALICE, ROOM): "앨리스 방 요약"}
    assert data.last_scores == ExpressionScores(0.1, 0.2, 0.3)
    assert [row.prompt for row in data.turns] == ["앨리스 하나", "앨리스 둘", "앨리스 셋"], "oldest first"
    assert list(data.turns) == list(reversed(await store.recent_turns(ALICE, 10)))
    assert {key: dict(values) for key, values in data.settings.items()} == {
        BLOCKED_SCOPE: {ALICE: "1"},
        ALICE: {BLOCK_NOTIFIED: "1"},
    }
    assert data.pending_messages == ('{"text": "먼저 온 말"}', '{"text": "늦게 온 말"}')
    assert "밥" not in repr(data) and "닮은꼴" not in repr(data) and BOB not in repr(data)


async def test_a_stranger_has_no_data(store: Store) -> None:
    """An export for someone never seen is empty, not an error."""
    await leave_a_trace(store, BOB, "밥")

    data = await store.user_data(ALICE)

    assert (data.memories, dict(data.summaries), data.last_scores, data.turns) == ((), {}, None, ())
    assert (dict(data.settings), data.pending_messages) == ({}, ())


async def test_pruning_by_age_keeps_the_recent_turns_and_everything_else(store: Store) -> None:
    """The turn log shrinks; memories, summaries and the statistics on what remains are untouched."""
    for at in range(1, 11):
        user = ALICE if at % 2 else BOB
        memory = new_memory("취미", f"등산 {at}") if at <= 2 else None
        await store.commit_turn(turn(user, prompt=f"턴 {at}", timings={"total": float(at)}, at=float(at)), memory)
    await store.commit_turn(turn(BOB, summary="밥 요약", at=10.5), None)

    assert await store.prune_turns(created_before=5.0, keep_latest=100) == 4, "strictly older than the cutoff"
    assert await store.prune_turns(created_before=5.0, keep_latest=100) == 0

    left = [row.created_at for row in reversed(await store.recent_turns(None, 100))]
    assert left == [5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 10.5]
    stats = await store.stats()
    assert (stats.turns_total, stats.users_total, stats.memories_total) == (7, 2, 2)
    assert stats.recent_latencies_s == (5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 1.0)
    assert texts(await store.memories(ALICE)) == ["[취미: 등산 1]"]
    assert await store.summary(conversation(BOB)) == "밥 요약"


async def test_the_row_cap_keeps_the_newest_turns(store: Store) -> None:
    """A busy bot's log is bounded by rows too; the newest survive, and logging goes on afterwards."""
    for at in range(8):
        await store.commit_turn(turn(ALICE if at % 2 else BOB, prompt=f"턴 {at}", at=float(at)), None)

    assert await store.prune_turns(created_before=float("-inf"), keep_latest=8) == 0
    assert await store.prune_turns(created_before=float("-inf"), keep_latest=3) == 5
    assert [row.prompt for row in await store.recent_turns(None, 10)] == ["턴 7", "턴 6", "턴 5"]
    # both limits at once: the age limit takes one more of the three
    assert await store.prune_turns(created_before=6.0, keep_latest=3) == 1
    assert [row.prompt for row in await store.recent_turns(None, 10)] == ["턴 7", "턴 6"]

    await store.commit_turn(turn(BOB, prompt="새 턴", at=9.0), None)
    stats = await store.stats()
    assert (stats.turns_total, stats.users_total) == (3, 2)
    assert [row.prompt for row in await store.recent_turns(BOB, 10)] == ["새 턴", "턴 6"]


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


# --------------------------------------------------------------------------------------------
# SQLite only: forgetting and pruning as the file on disk sees them

SECRETS = ("사과123비밀", "apple-secret-4242")
"""What Alice must never leave behind, in Korean and in ASCII (UTF-8 and plain bytes)."""
BOBS_WORDS = ("바나나평범한이야기", "banana-plain-777")


def database_bytes(path: Path) -> bytes:
    """The database, its write-ahead log and its index, as anyone with the files could read them."""
    files = [path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")]
    return b"".join(file.read_bytes() for file in files if file.exists())


def checkpoint_from_outside(path: Path) -> None:
    """Copy the log into the main file, so the secrets sit in both before the forget."""
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


async def tell_secrets(store: SqliteStore, round_: int) -> None:
    """Alice's secrets in every place a turn keeps text: memory (key, value, text, and so its index),
    summary, expression, the log (prompt, final input, answer, used memory, one long enough to spill
    onto overflow pages) and the inbox (payload and kept reply). Bob says ordinary things."""
    for n, secret in enumerate(SECRETS):
        event_id = f"{round_}-{n}"
        await store.receive_events([event(event_id, ALICE, payload=f'{{"text": "{secret}"}}', at=float(n))])
        record = dataclasses.replace(
            turn(
                ALICE, prompt=f"내 비밀번호는 {secret}이야", summary=f"{secret} 요약", scores=ExpressionScores(1, 2, 3)
            ),
            final_input=f"(오로라 답변 요약) {secret} (사용자 질문) {secret}",
            answer=f" {secret} 기억할게",
            used_memory=f"[비밀번호: {secret}]",
            event_id=event_id,
            reply=Reply(text=f"{secret} 기억할게", kind=ReplyKind.ANSWER),
        )
        await store.commit_turn(record, new_memory(f"비밀 {secret} {round_}", secret, seed=n))
    await store.commit_turn(turn(ALICE, prompt=" ".join([SECRETS[1]] * 600), chat=ROOM), None)  # ~10 KB
    for n, words in enumerate(BOBS_WORDS):
        await store.commit_turn(turn(BOB, prompt=words, summary=f"{words} 요약"), new_memory(f"말 {round_} {n}", words))


def secrets_in(stored: bytes) -> list[str]:
    return [secret for secret in SECRETS if secret.encode() in stored]


@pytest.mark.parametrize("closed", [False, True], ids=["store-open", "store-closed"])
async def test_forgotten_text_is_gone_from_the_files_bytes(tmp_path: Path, closed: bool) -> None:
    """Deleted rows must not linger in free space or in old log frames: `secure_delete` plus a
    checkpoint. An open store (a running service) must be clean the moment `forget_user` returns."""
    path = tmp_path / "ohlora.sqlite3"
    store = await SqliteStore.open(path)
    try:
        await tell_secrets(store, 1)
        checkpoint_from_outside(path)
        await tell_secrets(store, 2)  # these only in the log
        assert secrets_in(database_bytes(path)) == list(SECRETS), "the test must be able to see them at all"

        await store.forget_user(ALICE)
        if not closed:
            stored = database_bytes(path)
    finally:
        await store.close()
    if closed:
        stored = database_bytes(path)

    assert secrets_in(stored) == []
    assert all(words.encode() in stored for words in BOBS_WORDS), "Bob's turns are kept"
    async with await SqliteStore.open(path) as reopened:
        assert len(await reopened.memories(BOB)) == 4 and await reopened.footprint(ALICE) == NOTHING


def log_turns_directly(path: Path, count: int) -> None:
    """Many turns at once, past the store: pruning is under test here, and a thousand commits take a second."""
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.executemany(
            "INSERT INTO turns (created_at, platform, user_key, conversation_key, prompt, final_input, answer,"
            " timings, total_s, status) VALUES (?, 'discord', ?, ?, ?, '', '', '{\"total\": 1.0}', 1.0, 'ok')",
            [(float(n), user, conversation(user), f"턴 {n}") for n in range(count) for user in [(ALICE, BOB)[n % 2]]],
        )


async def test_pruning_more_than_one_batch_prunes_completely(tmp_path: Path) -> None:
    """Pruning works in batches of `_PRUNE_BATCH`; all of them must run, not only the first."""
    import core.store.sqlite as sqlite_module

    path = tmp_path / "ohlora.sqlite3"
    count = sqlite_module._PRUNE_BATCH * 2 + 234
    async with await SqliteStore.open(path) as store:
        log_turns_directly(path, count)

        assert await store.prune_turns(created_before=float("-inf"), keep_latest=100) == count - 100
        assert [row.prompt for row in await store.recent_turns(None, 2)] == [f"턴 {count - 1}", f"턴 {count - 2}"]
        assert await store.prune_turns(created_before=float(count - 10), keep_latest=100) == 90
        stats = await store.stats()
        assert (stats.turns_total, stats.users_total, stats.recent_latencies_s) == (10, 2, (1.0,) * 10)


async def test_a_turn_committed_while_pruning_does_not_wait_for_the_whole_prune(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch is its own transaction: a turn waiting for the store gets in between two batches."""
    import core.store.sqlite as sqlite_module

    monkeypatch.setattr(sqlite_module, "_PRUNE_BATCH", 10)
    path = tmp_path / "ohlora.sqlite3"
    async with await SqliteStore.open(path) as store:
        log_turns_directly(path, 1000)
        pruning = asyncio.create_task(store.prune_turns(created_before=1000.0, keep_latest=2000))
        await asyncio.sleep(0)  # the prune holds the store for its first batch
        await store.commit_turn(turn(BOB, prompt="새 턴", at=5000.0), new_memory("취미", "등산"))

        assert not pruning.done(), "the turn waited for every batch"
        assert await pruning == 1000
        assert [row.prompt for row in await store.recent_turns(None, 10)] == ["새 턴"]


async def test_pruned_turn_text_is_gone_from_the_files_bytes_while_the_store_is_open(tmp_path: Path) -> None:
    """Retention deletes what users said too: like a forget, a prune must not leave the text readable in
    the main file until some later checkpoint, which on a quiet bot may be days away."""
    path = tmp_path / "ohlora.sqlite3"
    async with await SqliteStore.open(path) as store:
        for n in range(50):
            await store.commit_turn(turn(prompt=f"{SECRETS[1]} {n:03d}", at=float(n)), None)
        checkpoint_from_outside(path)  # weeks later: the old turns live in the main file
        await store.commit_turn(turn(prompt=BOBS_WORDS[1], at=1000.0), None)
        assert secrets_in(database_bytes(path)) == [SECRETS[1]]

        assert await store.prune_turns(created_before=100.0, keep_latest=1000) == 50

        stored = database_bytes(path)
    assert secrets_in(stored) == []
    assert BOBS_WORDS[1].encode() in stored
