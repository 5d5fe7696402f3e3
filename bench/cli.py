"""`ohlora bench` / `python -m bench`: build random-weight models, measure both sides, report.

The run has four steps: build every model of the profile into a temporary layout (this
process), then measure our pipeline, the seed-style baseline and the int8-against-bfloat16
agreement, each in a child process of its own so that resident memory is per side. The
seed-style side replays the prompts our side produced, so both generate from the same text.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def configure_bench_parser(parser: argparse.ArgumentParser) -> None:
    """The bench's options, on a parser of its own or on the `ohlora bench` sub-command."""
    profiles = parser.add_mutually_exclusive_group()
    profiles.add_argument(
        "--quick",
        dest="profile",
        action="store_const",
        const="quick",
        help="the real shapes, fewer turns timed: about 7 minutes on 2 idle cores (the default)",
    )
    profiles.add_argument(
        "--full",
        dest="profile",
        action="store_const",
        const="full",
        help="the real shapes, more turns and frames timed",
    )
    profiles.add_argument(
        "--tiny",
        dest="profile",
        action="store_const",
        const="tiny",
        help="toy widths, seconds: checks that the bench runs, its numbers mean nothing",
    )
    parser.set_defaults(profile="quick")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="build the models in DIR and keep them")
    parser.add_argument(
        "--timeout", type=float, default=3600.0, metavar="S", help="give up on a side after S seconds (default 3600)"
    )


def run_bench(args: argparse.Namespace) -> int:
    """Build, measure both sides and the agreement, print the table (or JSON); 0 once printed.

    The exit status does not depend on the targets: they are results, stated in the output.
    """
    from bench.build import build_bench_models, quiet_libraries
    from bench.config import PROFILES
    from bench.report import assemble, table

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    quiet_libraries()
    profile = PROFILES[args.profile]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ohlora-bench-") as scratch:
        root = args.keep or Path(scratch) / "models"
        logger.info("building %s models in %s", profile.name, root)
        build_started = time.perf_counter()
        build_bench_models(root, profile)
        build_s = time.perf_counter() - build_started

        def side(name: str, *extra: str) -> dict[str, Any]:
            output = Path(scratch) / f"{name}.json"
            command = [sys.executable, "-m", "bench.child", name, "--root", str(root), "--profile", profile.name]
            logger.info("measuring %s", name)
            subprocess.run(
                [*command, "--output", str(output), *extra], check=True, timeout=args.timeout, stdout=subprocess.DEVNULL
            )
            result: dict[str, Any] = json.loads(output.read_text(encoding="utf-8"))
            return result

        ours = side("ours")
        ours_file = str(Path(scratch) / "ours.json")
        seed = side("seed_style", "--ours", ours_file)
        agreement = side("agreement", "--ours", ours_file)
    result = assemble(profile, ours, seed, agreement, build_s, time.perf_counter() - started)
    sys.stdout.write((json.dumps(result, ensure_ascii=False, indent=1) if args.json else table(result)) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure our pipeline against the original's approach on random weights of the real shapes.",
    )
    configure_bench_parser(parser)
    return run_bench(parser.parse_args(argv))
