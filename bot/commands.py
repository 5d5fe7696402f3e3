"""What Discord, Telegram and the console share: chat gating and every user and admin command.

Adapters translate platform events into a `Caller` plus arguments and send the `CommandResult`
back; they never decide who may do what. Two kinds of power are checked here, in one place, and a
refused command changes nothing:

- bot-wide (anyone's memories, blocks, the service's stats) belongs to `OHLORA_ADMIN_IDS` alone;
- a chat's own settings (where she answers, its face) also to that chat's platform admins
  (Discord's Manage Server in that server), who have no say over users' data elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from core.engine import Engine, Refused, Working
from core.export import user_data_json
from core.store import Footprint, Store, normalize
from core.types import IncomingMessage, RenderedFace, Reply, ReplyKind, conversation_key, user_key

BLOCKED_TEXT = "미안, 지금은 너랑 이야기할 수 없어. 🙏"
NOT_ADMIN_TEXT = "이건 관리자만 쓸 수 있는 명령이에요. 🔒"
NO_MEMORIES_TEXT = "아직 기억하고 있는 게 없어! 나한테 너에 대해 알려 줄래? 😊"
PRIVATE_ONLY_TEXT = "그건 둘만 있을 때 할게 🤫 나한테 개인 메시지로 다시 보내 줘!"
"""Where everyone in a group would read the answer, memories and data are never shown, nor deleted there."""
TEXT_ONLY_TEXT = "아직은 글만 읽을 수 있어 📝 하고 싶은 말을 글로 보내 줄래?"
"""For a message addressed to her that carries only a picture, a sticker or a file."""
NOT_NOW_TEXT = "지금은 할 수 없어. 조금 뒤에 다시 해 줘. 🙏"
"""Where a command must be answered (a Discord interaction) but the user was already told why not."""
BLOCK_NOTIFIED = "block_notified"

HELP_TEXT = """안녕! 나는 오로라야 👱‍♀️ 편하게 말 걸어 줘.

/memory — 내가 기억하는 너에 대한 것들
/forget — 너에 대한 모든 것 지우기 (/forget 키: 기억 하나만)
/mydata — 내가 저장한 너의 모든 데이터 받기
/reset — 지금까지의 대화 요약 지우기
/face — 지금 내 얼굴 보기
/help — 이 도움말"""
NOTHING_TO_FORGET_TEXT = "지울 게 없어. 나는 아직 너에 대해 저장한 게 없어."


@dataclass(frozen=True)
class Caller:
    """Who issued a command, where.

    `platform_admin` is the platform's own say over this chat (Manage Server in this Discord
    server): it covers the chat's settings, never users' data.
    """

    platform: str
    user_id: str
    chat_id: str
    platform_admin: bool = False

    @property
    def user_key(self) -> str:
        return user_key(self.platform, self.user_id)

    @property
    def conversation_key(self) -> str:
        return conversation_key(self.platform, self.chat_id, self.user_id)


@dataclass(frozen=True)
class DataFile:
    """A file a command sends (the `/mydata` export)."""

    data: bytes
    filename: str
    mime_type: str = "application/json"


@dataclass(frozen=True)
class CommandResult:
    text: str
    ok: bool = True
    image: RenderedFace | None = None
    file: DataFile | None = None


@dataclass(frozen=True)
class Stats:
    turns_total: int
    users_total: int
    memories_total: int
    latency_p50_s: float | None
    latency_p95_s: float | None
    pending_turns: int
    model_profile: str
    uptime_s: float

    def describe(self) -> str:
        def seconds(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}s"

        hours, rest = divmod(int(self.uptime_s), 3600)
        minutes, secs = divmod(rest, 60)
        return (
            f"turns: {self.turns_total}\n"
            f"users: {self.users_total}\n"
            f"memories: {self.memories_total}\n"
            f"latency p50 / p95: {seconds(self.latency_p50_s)} / {seconds(self.latency_p95_s)}\n"
            f"queue depth: {self.pending_turns}\n"
            f"model profile: {self.model_profile}\n"
            f"uptime: {hours}h {minutes:02d}m {secs:02d}s"
        )


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile; None for no data."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, round(fraction * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class _Blocks:
    users: set[str]
    notified: set[str]
    """Blocked users already told once; they hear nothing more."""


class Commands:
    def __init__(
        self,
        engine: Engine,
        store: Store,
        *,
        admin_ids: frozenset[str],
        model_profile: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._store = store
        self._admin_ids = admin_ids
        self._model_profile = model_profile
        self._clock = clock
        self._blocks: _Blocks | None = None
        self._loading_blocks = asyncio.Lock()

    def is_bot_admin(self, caller: Caller) -> bool:
        """Bot-wide powers: anyone's memories, blocks, the service's stats."""
        return caller.user_key in self._admin_ids

    def may_manage_chat(self, caller: Caller) -> bool:
        """A chat's own settings: where she answers, which face she wears there."""
        return caller.platform_admin or self.is_bot_admin(caller)

    async def chat(self, message: IncomingMessage, working: Working | None = None) -> Reply | None:
        """A turn, unless the user may not have one now; None means stay silent.

        Blocks and rate limits are decided before the message waits for anything: a blocked user
        gets one short notice and silence after it, a flood one notice per window. `working`
        (the platform's "typing…") is only shown for the turn itself.
        """
        refusal = await self._turned_away(message.user_key, metered=True)
        if refusal is not None:
            return refusal.notice
        return await self._engine.reply(message, working)

    async def media_only(self, message: IncomingMessage) -> Reply | None:
        """A picture, sticker or file said to her without a word: she reads only text.

        Gated like a message, so a blocked or flooding user hears it once, not once per picture;
        None means stay silent.
        """
        refusal = await self._turned_away(message.user_key, metered=True)
        if refusal is not None:
            return refusal.notice
        return Reply(text=TEXT_ONLY_TEXT, kind=ReplyKind.NOTICE)

    async def _turned_away(self, key: str, *, metered: bool) -> Refused | None:
        """Why `key` gets no answer now: blocked, or (for what uses a model) over the rate limit."""
        blocks = await self._blocked()
        if key in blocks.users:
            if key in blocks.notified:
                return Refused(notice=None)
            blocks.notified.add(key)
            await self._store.set_setting(key, BLOCK_NOTIFIED, "1")
            return Refused(notice=Reply(text=BLOCKED_TEXT, kind=ReplyKind.NOTICE))
        return self._engine.admit(key) if metered else None

    async def _blocked(self) -> _Blocks:
        """Blocks, read from the store once and kept here, so that checking one costs no wait."""
        if self._blocks is None:
            async with self._loading_blocks:
                if self._blocks is None:
                    users = set(await self._store.blocked_users())
                    notified = {key for key in users if await self._store.get_setting(key, BLOCK_NOTIFIED)}
                    self._blocks = _Blocks(users, notified)
        return self._blocks

    # Everyone's commands: they only ever touch the caller's own data. A blocked user's get the
    # block notice (once) instead, except `/forget`: a user may always delete what they left.

    def help(self) -> CommandResult:
        return CommandResult(HELP_TEXT)

    async def memory(self, caller: Caller) -> CommandResult | None:
        refusal = await self._turned_away(caller.user_key, metered=False)
        if refusal is not None:
            return _result_of(refusal)
        return await self._list_memories(caller.user_key, NO_MEMORIES_TEXT)

    async def forget_preview(self, caller: Caller, key: str | None) -> CommandResult:
        """What `forget` would delete, for the confirmation step: one memory, or everything."""
        memories = await self._store.memories(caller.user_key)
        if key is None:
            footprint = await self._store.footprint(caller.user_key)
            if footprint.empty:
                return CommandResult(NOTHING_TO_FORGET_TEXT, ok=False)
            listed = "".join(f"\n  - {m.text}" for m in memories)
            return CommandResult(
                f"정말 너에 대한 모든 것을 지울까? 지우면 되돌릴 수 없어.\n{_describe(footprint)}{listed}\n"
                "(차단 여부는 관리자의 결정이라 남아.)"
            )
        chosen = [m for m in memories if normalize(m.key) == normalize(key)]
        if not chosen:
            return CommandResult(_no_such_memory(key), ok=False)
        lines = "\n".join(f"• {m.text}" for m in chosen)
        return CommandResult(f"정말 이 기억을 지울까? 지우면 되돌릴 수 없어.\n{lines}")

    async def forget(self, caller: Caller, key: str | None) -> CommandResult:
        """One memory by key, or (None) everything stored about the caller."""
        if key is None:
            gone = await self._engine.forget_user(caller.user_key)
            return _forgotten(gone, done="너에 대해 저장한 것을 모두 지웠어. 🧹", nothing=NOTHING_TO_FORGET_TEXT)
        deleted = await self._engine.forget_memory(caller.user_key, key)
        if not deleted:
            return CommandResult(_no_such_memory(key), ok=False)
        return CommandResult(f"기억 {deleted}개를 지웠어. 🧹")

    async def my_data(self, caller: Caller) -> CommandResult:
        """Everything stored about the caller as a JSON file; blocked users get theirs too."""
        data = await self._store.user_data(caller.user_key)
        export = user_data_json(data, self._clock())
        safe_name = "".join(char if char.isalnum() else "-" for char in caller.user_key)
        return CommandResult(
            "내가 저장한 너에 대한 모든 데이터야. 📄 지우고 싶으면 /forget 을 보내 줘.",
            file=DataFile(export, f"ohlora-mydata-{safe_name}.json"),
        )

    async def reset(self, caller: Caller) -> CommandResult | None:
        refusal = await self._turned_away(caller.user_key, metered=False)
        if refusal is not None:
            return _result_of(refusal)
        await self._store.clear_summaries(caller.user_key, caller.conversation_key)
        return CommandResult("지금까지의 대화 요약을 지웠어. 처음부터 다시 이야기하자! ✨")

    async def face(self, caller: Caller, working: Working | None = None) -> CommandResult | None:
        """Her face as the caller last saw it: a render, so metered like a message."""
        refusal = await self._turned_away(caller.user_key, metered=True)
        if refusal is not None:
            return _result_of(refusal)
        if working is None:
            image = await self._engine.render_current_face(caller.platform, caller.chat_id, caller.user_key)
        else:
            async with working():
                image = await self._engine.render_current_face(caller.platform, caller.chat_id, caller.user_key)
        return CommandResult(f"오로라 얼굴 #{image.face} 👱‍♀️", image=image)

    def faces(self) -> Sequence[int]:
        return self._engine.faces()

    async def memory_keys(self, caller: Caller) -> list[str]:
        """The caller's memory keys, for suggesting what `forget` can take."""
        return [memory.key for memory in await self._store.memories(caller.user_key)]

    async def is_channel_allowed(self, platform: str, channel_id: str) -> bool:
        """Whether an admin let Oh-LoRA answer every message in this group channel."""
        return await self._store.is_channel_allowed(platform, channel_id)

    async def move_chat(self, platform: str, old_chat_id: str, new_chat_id: str) -> None:
        """The platform gave a chat a new id (a Telegram group became a supergroup)."""
        await self._engine.move_chat(platform, old_chat_id, new_chat_id)

    # A chat's settings: its platform admins and the bot's admins.

    async def allow_channel(self, caller: Caller, channel_id: str, allowed: bool) -> CommandResult:
        if not self.may_manage_chat(caller):
            return _refused()
        await self._store.set_channel_allowed(caller.platform, channel_id, allowed)
        verb = "이제 이 채널에서는 멘션 없이도 대답할게요." if allowed else "이 채널에서는 멘션될 때만 대답할게요."
        return CommandResult(verb)

    async def set_face(self, caller: Caller, face: int | None) -> CommandResult:
        if not self.may_manage_chat(caller):
            return _refused()
        try:
            await self._engine.set_face(caller.platform, caller.chat_id, face)
        except ValueError as error:
            return CommandResult(str(error), ok=False)
        return CommandResult("기본 얼굴로 돌아갔어요." if face is None else f"이 대화의 얼굴을 #{face}(으)로 정했어요.")

    # Bot-wide powers: OHLORA_ADMIN_IDS only.

    async def memory_of(self, caller: Caller, target_key: str) -> CommandResult:
        if not self.is_bot_admin(caller):
            return _refused()
        return await self._list_memories(target_key, f"{target_key}: 저장된 기억이 없어요.")

    async def forget_of(self, caller: Caller, target_key: str) -> CommandResult:
        """Everything stored about anyone, as their own `/forget` would (their block stays)."""
        if not self.is_bot_admin(caller):
            return _refused()
        gone = await self._engine.forget_user(target_key)
        return _forgotten(
            gone, done=f"{target_key}: 저장된 것을 모두 지웠어요.", nothing=f"{target_key}: 저장된 게 없어요."
        )

    async def block(self, caller: Caller, target_key: str, blocked: bool) -> CommandResult:
        if not self.is_bot_admin(caller):
            return _refused()
        if target_key == caller.user_key and blocked:
            return CommandResult("자기 자신은 차단할 수 없어요.", ok=False)
        blocks = await self._blocked()
        await self._store.set_blocked(target_key, blocked)
        if blocked:
            blocks.users.add(target_key)
        else:
            await self._store.delete_setting(target_key, BLOCK_NOTIFIED)
            blocks.users.discard(target_key)
            blocks.notified.discard(target_key)
        return CommandResult(f"{target_key}: {'차단했어요' if blocked else '차단을 풀었어요'}.")

    async def stats(self, caller: Caller) -> CommandResult:
        if not self.is_bot_admin(caller):
            return _refused()
        return CommandResult((await self.collect_stats()).describe())

    async def collect_stats(self) -> Stats:
        stored = await self._store.stats()
        latencies = stored.recent_latencies_s
        return Stats(
            turns_total=stored.turns_total,
            users_total=stored.users_total,
            memories_total=stored.memories_total,
            latency_p50_s=percentile(latencies, 0.5),
            latency_p95_s=percentile(latencies, 0.95),
            pending_turns=self._engine.pending_turns,
            model_profile=self._model_profile,
            uptime_s=self._clock() - self._engine.started_at,
        )

    async def _list_memories(self, key: str, empty_text: str) -> CommandResult:
        memories = await self._store.memories(key)
        if not memories:
            return CommandResult(empty_text)
        lines = "\n".join(f"{index}. {m.text}" for index, m in enumerate(memories, start=1))
        return CommandResult(f"기억하고 있는 것들:\n{lines}")


def _result_of(refusal: Refused) -> CommandResult | None:
    return None if refusal.notice is None else CommandResult(refusal.notice.text, ok=False)


def _describe(footprint: Footprint) -> str:
    parts = [
        f"기억 {footprint.memories}개",
        f"대화 요약 {footprint.summaries}개",
        f"대화 기록 {footprint.turns}개",
    ]
    if footprint.expression:
        parts.append("마지막 표정")
    return "• " + ", ".join(parts)


def _forgotten(footprint: Footprint, *, done: str, nothing: str) -> CommandResult:
    if footprint.empty:
        return CommandResult(nothing, ok=False)
    return CommandResult(f"{done}\n{_describe(footprint)}")


def _no_such_memory(key: str | None) -> str:
    return "지울 기억이 없어." if key is None else f"'{key}'(이)라는 기억은 없어."


def _refused() -> CommandResult:
    return CommandResult(NOT_ADMIN_TEXT, ok=False)
