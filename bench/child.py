"""One side of the benchmark in a process of its own: `python -m bench.child SIDE ...`.

A process per side keeps each side's peak resident memory its own; the parent passes paths in
and reads one JSON file back.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

SIDES = ("ours", "seed_style", "agreement")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.child")
    parser.add_argument("side", choices=SIDES)
    parser.add_argument("--root", type=Path, required=True, help="the benchmark's model layout")
    parser.add_argument("--profile", required=True)
    parser.add_argument("--output", type=Path, required=True, help="where to write this side's JSON")
    parser.add_argument("--ours", type=Path, help="our side's JSON (its prompts are replayed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")

    from bench.build import quiet_libraries
    from bench.config import PROFILES
    from bench.workload import memory_lines
    from models.layout import ModelLayout

    quiet_libraries()
    profile = PROFILES[args.profile]
    layout = ModelLayout(args.root)
    replay = json.loads(args.ours.read_text(encoding="utf-8"))["replay"] if args.ours else []
    if args.side == "ours":
        from bench.ours import measure_ours

        result = measure_ours(layout, profile)
    elif args.side == "seed_style":
        from bench.seed_style import measure_seed_style

        result = measure_seed_style(layout, profile, memory_lines(profile.memories), replay)
    else:
        from bench.agreement import measure_agreement

        result = measure_agreement(layout, replay)
    args.output.write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
