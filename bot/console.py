"""`ohlora chat`: talk to Oh-LoRA in a terminal, over the same engine the bots use.

Lines are read until end of input (or `/quit`), so a pipe works as well as a keyboard. A line
that starts with "/" is a command, never a message: the user's own commands of the bots
(`/memory`, `/forget`, `/reset`) through the same command layer, `/help`, and `/quit`. The faces
can be saved as PNG files, and `--show-prompts` makes every adapter request visible, which is how
a person checks that nothing they typed ever reaches a prompt as a control marker.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from bot.commands import Caller, CommandResult, Commands
from core.types import Generation, GenerationRequest, IncomingMessage, Reply, ReplyKind, TextGenerator

PLATFORM = "console"
WELCOME = "오로라와 대화를 시작해요! (명령은 /help, 끝내려면 /quit 또는 Ctrl+D)"
FORGET_USAGE = "/forget 키 — 그 기억 지우기 (/forget all: 너에 대한 모든 것)"
CONSOLE_HELP = f"""/memory — 내가 기억하는 너에 대한 것들
{FORGET_USAGE}
/mydata — 내가 저장한 너의 모든 데이터를 JSON 파일로 (지금 폴더에)
/reset — 지금까지의 대화 요약 지우기
/help — 이 도움말
/quit — 대화 끝내기"""
UNKNOWN_COMMAND_TEXT = "그런 명령은 몰라. /help 를 입력해 봐!"
QUIT_COMMANDS = frozenset({"/quit", "/exit"})


class PromptEcho:
    """A TextGenerator that writes each request as one JSON line before passing it on."""

    def __init__(self, inner: TextGenerator, sink: TextIO) -> None:
        self._inner = inner
        self._sink = sink

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Generation]]:
        for request in requests:
            line = {"task": request.task.value, "prompt": request.prompt}
            self._sink.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._sink.flush()
        return self._inner.generate(requests)

    def count_tokens(self, text: str) -> int:
        return self._inner.count_tokens(text)


@dataclass(frozen=True)
class ConsoleOptions:
    user: str = "me"
    save_faces: Path | None = None
    verbose: bool = False


class FaceSaver:
    """Numbers the saved faces after those already in the folder, so runs never overwrite."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._folder = folder
        existing = [int(p.stem.split("_")[-1]) for p in folder.glob("reply_*.*") if p.stem.split("_")[-1].isdigit()]
        self._next = max(existing, default=0) + 1

    def save(self, data: bytes, extension: str) -> Path:
        path = self._folder / f"reply_{self._next:04d}.{extension}"
        path.write_bytes(data)
        self._next += 1
        return path


async def run_console(
    commands: Commands,
    options: ConsoleOptions,
    *,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    stderr: TextIO = sys.stderr,
) -> int:
    interactive = stdin.isatty()
    saver = FaceSaver(options.save_faces) if options.save_faces else None
    if interactive:
        stdout.write(WELCOME + "\n")
    while True:
        if interactive:
            stdout.write("나: ")
            stdout.flush()
        line = await asyncio.to_thread(stdin.readline)
        text = line.rstrip("\n")
        if not line or text.strip() in QUIT_COMMANDS:
            return 0
        if text.startswith("/"):
            result = await _command(commands, Caller(PLATFORM, options.user, PLATFORM), text)
            if result is not None:
                stdout.write(f"{result.text}\n")
                stdout.flush()
            continue
        message = IncomingMessage(platform=PLATFORM, user_id=options.user, chat_id=PLATFORM, text=text)
        reply = await commands.chat(message)
        if reply is None:
            continue
        stdout.write(f"오로라: {reply.text}\n")
        stdout.flush()
        if saver and reply.image:
            path = saver.save(reply.image.data, reply.image.filename.rsplit(".", 1)[-1])
            if options.verbose:
                stderr.write(f"  [face] {path}\n")
        if options.verbose:
            _describe(reply, stderr)


async def _command(commands: Commands, caller: Caller, line: str) -> CommandResult | None:
    """A console command: the bots' own user commands, with `/forget all` for "forget everything"."""
    name, _, argument = line.strip().partition(" ")
    argument = argument.strip()
    if name == "/help":
        return CommandResult(CONSOLE_HELP)
    if name == "/memory":
        return await commands.memory(caller)
    if name == "/reset":
        return await commands.reset(caller)
    if name == "/forget" and argument:
        # No confirmation button here: typing "all" is the confirmation, and a pipe must work.
        return await commands.forget(caller, None if argument == "all" else argument)
    if name == "/mydata":
        return _saved(await commands.my_data(caller))
    if name == "/forget":
        return CommandResult(FORGET_USAGE, ok=False)
    return CommandResult(UNKNOWN_COMMAND_TEXT, ok=False)


def _saved(result: CommandResult) -> CommandResult:
    """The export written into the current folder; the terminal shows where."""
    if result.file is None:
        return result
    path = Path(result.file.filename).resolve()
    path.write_bytes(result.file.data)
    return CommandResult(f"{result.text}\n{path}")


def _describe(reply: Reply, stream: TextIO) -> None:
    if reply.kind is not ReplyKind.ANSWER:
        stream.write(f"  [{reply.kind.value}]\n")
    if reply.used_memory:
        stream.write(f"  [memory] {reply.used_memory}\n")
    if reply.summary is not None:
        stream.write(f"  [summary] {reply.summary}\n")
    if reply.expression and reply.scores:
        e, s = reply.expression, reply.scores
        stream.write(
            f"  [expression] 눈 {e.eyes}, 입 {e.mouth}, 고개 돌림 {e.pose}"
            f" -> eyes {s.eyes:+.3f}, mouth {s.mouth:+.3f}, pose {s.pose:+.3f}\n"
        )
    if reply.timings:
        stages = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in reply.timings.items())
        stream.write(f"  [timings] {stages}\n")
    stream.flush()
