"""The per-user store: both implementations behave alike, and SQLite keeps its promises on disk."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.store import (
    SCHEMA_VERSION,
    InMemoryStore,
    NewMemory,
    SchemaTooNew,
    SqliteStore,
    Store,
    StoredMemory,
    StoreError,
    TurnRecord,
    migrate,
    normalize,
    schema_version,
)
from core.types import Expression, ExpressionScores

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
