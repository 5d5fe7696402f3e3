"""`ohlora chat`: talk to Oh-LoRA in a terminal, over the same engine the bots use.

Lines are read until end of input, so a pipe works as well as a keyboard. The faces can be saved
as PNG files, and `--show-prompts` makes every adapter request visible, which is how a person
checks that nothing they typed ever reaches a prompt as a control marker.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from core.engine import Engine
from core.types import Generation, GenerationRequest, IncomingMessage, Reply, ReplyKind, TextGenerator

PLATFORM = "console"
WELCOME = "오로라와 대화를 시작해요! (끝내려면 Ctrl+D)"


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
    engine: Engine,
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
        if not line:
            return 0
        message = IncomingMessage(platform=PLATFORM, user_id=options.user, chat_id=PLATFORM, text=line.rstrip("\n"))
        reply = await engine.reply(message)
        stdout.write(f"오로라: {reply.text}\n")
        stdout.flush()
        if saver and reply.image:
            path = saver.save(reply.image.data, reply.image.filename.rsplit(".", 1)[-1])
            if options.verbose:
                stderr.write(f"  [face] {path}\n")
        if options.verbose:
            _describe(reply, stderr)


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
