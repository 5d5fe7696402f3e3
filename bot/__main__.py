"""The `ohlora` command and the composition root: the one place that wires models, core and bots.

Heavy imports (torch and the model code) happen inside the sub-commands that need them, so
`ohlora --help` answers at once.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.config import LlmBackend, ModelProfile, Settings
from core.engine import Engine, EngineOptions
from core.retention import Retention, prune_once
from core.store import SqliteStore, StoreError
from core.types import Models
from core.worker import InferenceWorker

logger = logging.getLogger("ohlora")

EXIT_MISSING_MODELS = 2
EXIT_LOGIN_FAILED = 3
EXIT_DATABASE_UNUSABLE = 4


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 1
    return int(args.handler(args))


def build_parser() -> argparse.ArgumentParser:
    from models.hub import configure_download_parser, run_download

    parser = argparse.ArgumentParser(
        prog="ohlora",
        description="Oh-LoRA (오로라), a Korean-speaking virtual human, as a terminal chat and a Discord/Telegram bot.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    chat = commands.add_parser(
        "chat",
        help="chat with Oh-LoRA in the terminal",
        description="Chat with Oh-LoRA in the terminal. Reads lines until end of input (works with a pipe).",
    )
    chat.add_argument(
        "--profile",
        choices=[profile.value for profile in ModelProfile],
        help="real: the downloaded checkpoints; tiny: small offline stand-ins, no download"
        " (default: OHLORA_MODEL_PROFILE or real)",
    )
    chat.add_argument("--db", type=Path, help="SQLite database (default: OHLORA_DB_PATH or data/ohlora.sqlite3)")
    chat.add_argument("--save-faces", type=Path, metavar="DIR", help="write each reply's face to DIR as a PNG")
    chat.add_argument("--user", default="me", help="who is talking; each user has their own memories (default: me)")
    chat.add_argument(
        "--show-prompts", action="store_true", help='print every adapter request as {"task", "prompt"} JSON on stderr'
    )
    chat.add_argument("--verbose", action="store_true", help="show memory used, summary, expression and timings")
    chat.add_argument("--seed", type=int, help="seed sampling and face choice, for reproducible sessions")
    chat.set_defaults(handler=_chat)

    bots = commands.add_parser(
        "bot",
        help="run the Discord and/or Telegram bot",
        description="Run every bot whose token is set (DISCORD_TOKEN, TELEGRAM_TOKEN) in one process.",
    )
    bots.add_argument("--profile", choices=[profile.value for profile in ModelProfile])
    bots.add_argument("--db", type=Path)
    bots.set_defaults(handler=_bot)

    download = commands.add_parser(
        "download",
        help="fetch the published checkpoints and data files",
        description="Fetch every checkpoint of the real profile into the on-disk layout below.",
    )
    configure_download_parser(download)
    download.set_defaults(handler=run_download)

    export = commands.add_parser(
        "export-merged",
        help="merge each adapter into its own full model, for serving with vLLM",
        description="Write four merged models (base + one adapter each) and print the `vllm serve` commands.",
    )
    export.add_argument("--models-dir", type=Path, help="the downloaded checkpoints (default: OHLORA_MODELS_DIR)")
    export.add_argument("--out", type=Path, default=Path("data/merged"), help="where to write (default: data/merged)")
    export.add_argument("--host", default="localhost", help="the GPU host the servers will run on, for the URL")
    export.add_argument("--first-port", type=int, default=8001, help="port of the first server (default: 8001)")
    export.set_defaults(handler=_export_merged)

    from bench.cli import configure_bench_parser, run_bench

    bench = commands.add_parser(
        "bench",
        help="measure our pipeline against the original's approach, on random weights of the real shapes",
    )
    configure_bench_parser(bench)
    bench.set_defaults(handler=run_bench)
    return parser


def _export_merged(args: argparse.Namespace) -> int:
    from models.errors import ModelFilesMissing
    from models.layout import ModelLayout
    from models.merge import export_merged
    from models.vllm_backend import merged_serve_commands, merged_url_setting

    _configure_logging("INFO")
    layout = ModelLayout(args.models_dir or Settings().models_dir)
    try:
        written = export_merged(layout, args.out)
    except ModelFilesMissing as error:
        print(error, file=sys.stderr)
        return EXIT_MISSING_MODELS
    print("Start one server per task on the GPU host:")
    for command in merged_serve_commands(written, first_port=args.first_port).values():
        print(f"  {command}")
    print("Then point the bot at them:")
    print("  OHLORA_LLM_BACKEND=vllm")
    print(f"  OHLORA_VLLM_URL={merged_url_setting(args.host, first_port=args.first_port)}")
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "profile", None):
        overrides["model_profile"] = args.profile
    if getattr(args, "db", None):
        overrides["db_path"] = args.db
    return Settings(**overrides)


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "discord.gateway", "telegram.ext"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # python-telegram-bot logs request URLs, which carry the token, at DEBUG; aiosqlite logs every
    # statement with its parameters (what users wrote) at DEBUG.
    for secretive in ("telegram", "aiosqlite"):
        logging.getLogger(secretive).setLevel(max(logging.INFO, logging.getLogger().level))


def _database_unusable(settings: Settings) -> bool:
    """Open the database once before the models load (minutes for the real ones), so that a path
    that cannot hold it, or a file from a newer version, is reported at once, plainly, with its own
    exit code."""

    async def probe() -> None:
        store = await SqliteStore.open(settings.db_path)
        await store.close()

    try:
        asyncio.run(probe())
    except StoreError as error:
        print(error, file=sys.stderr)
        return True
    return False


def _engine_options(settings: Settings) -> EngineOptions:
    return EngineOptions(
        max_prompt_tokens=settings.max_prompt_tokens,
        max_pending_turns=settings.queue_size,
        turn_timeout_s=settings.turn_timeout_s,
        memory_threshold=settings.memory_threshold,
        parallel_samples=settings.parallel_samples,
        rate_limit_per_minute=settings.rate_limit_per_minute,
        default_face=settings.default_face,
        animate=settings.animate_faces,
    )


def _load_worker(settings: Settings, *, seed: int | None = None, show_prompts: bool = False) -> InferenceWorker:
    from transformers.utils import logging as transformers_logging

    from models.layout import ModelLayout
    from models.runtime import VllmEndpoint, load_models, tiny_layout

    transformers_logging.disable_progress_bar()  # per-load bars are noise in a chat or a service log
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

    vllm = None
    if settings.llm_backend is LlmBackend.VLLM and settings.vllm_url:
        api_key = settings.vllm_api_key.get_secret_value() if settings.vllm_api_key else None
        vllm = VllmEndpoint(settings.vllm_url, api_key, settings.vllm_timeout_s)
    tiny = settings.model_profile is ModelProfile.TINY

    def load() -> Models:
        # Inside: building the tiny models on a first run trains them, and torch work belongs on
        # the serving thread (see `InferenceWorker.loading`).
        layout = tiny_layout(settings.tiny_models_dir) if tiny else ModelLayout(settings.models_dir)
        loaded = load_models(
            layout,
            device=settings.device,
            dtype=settings.dtype,
            llm_int8=settings.llm_int8,
            face_precision=settings.face_precision,
            seed=seed,
            default_face=settings.default_face,
            verify=not tiny,
            vllm=vllm,
        )
        if not show_prompts:
            return loaded
        from bot.console import PromptEcho

        return dataclasses.replace(loaded, generator=PromptEcho(loaded.generator, sys.stderr))

    return InferenceWorker.loading(load, stall_after_s=settings.stall_after_s)


def _chat(args: argparse.Namespace) -> int:
    import random

    from bot.commands import Commands
    from bot.console import ConsoleOptions, run_console
    from models.errors import ModelFilesMissing

    settings = _settings(args)
    _configure_logging("INFO" if args.verbose else "WARNING")
    if sys.stdin.isatty():
        tiny = settings.model_profile is ModelProfile.TINY
        first_time = " (the first run builds the tiny models and the int8 kernel, 1-2 minutes)" if tiny else ""
        print(f"오로라를 깨우는 중… loading models{first_time}", file=sys.stderr)
    if _database_unusable(settings):
        return EXIT_DATABASE_UNUSABLE
    try:
        worker = _load_worker(settings, seed=args.seed, show_prompts=args.show_prompts)
    except ModelFilesMissing as error:
        print(error, file=sys.stderr)
        return EXIT_MISSING_MODELS

    async def session() -> int:
        store = await SqliteStore.open(settings.db_path)
        await prune_once(store, Retention.of(settings), time.time())
        worker.start()
        try:
            rng = random.Random(args.seed) if args.seed is not None else None
            # One person at a terminal, often a pipe of lines: nothing to rate-limit.
            options = dataclasses.replace(_engine_options(settings), rate_limit_per_minute=0)
            engine = Engine(worker, store, options, rng=rng)
            commands = Commands(engine, store, admin_ids=settings.admin_ids, model_profile=settings.model_profile.value)
            console = ConsoleOptions(user=args.user, save_faces=args.save_faces, verbose=args.verbose)
            return await run_console(commands, console)
        finally:
            await worker.stop()
            await store.close()

    try:
        return asyncio.run(session())
    except KeyboardInterrupt:
        return 130


def _bot(args: argparse.Namespace) -> int:
    from bot.alerts import AdminAlerts
    from bot.errors import BotLoginFailed
    from bot.service import MissingTokens, serve
    from models.errors import ModelFilesMissing

    settings = _settings(args)
    _configure_logging(settings.log_level)
    if settings.discord_token is None and settings.telegram_token is None:
        print(MissingTokens.MESSAGE, file=sys.stderr)
        return 1
    if _database_unusable(settings):
        return EXIT_DATABASE_UNUSABLE
    try:
        worker = _load_worker(settings)
    except ModelFilesMissing as error:
        print(error, file=sys.stderr)
        return EXIT_MISSING_MODELS

    async def service() -> int:
        store = await SqliteStore.open(settings.db_path)
        worker.start()
        try:
            alerts = AdminAlerts()
            engine = Engine(worker, store, _engine_options(settings), alarm=alerts)
            await serve(engine, store, settings, alerts=alerts)
            return 0
        except BotLoginFailed as error:
            print(error, file=sys.stderr)
            return EXIT_LOGIN_FAILED
        finally:
            await worker.stop()
            await store.close()

    return asyncio.run(service())


if __name__ == "__main__":
    sys.exit(main())
