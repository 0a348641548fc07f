"""`python -m pipeline <verb>`: explain, costs, compare, reproduce, gc, verify, list, docs, fetch, perf."""
from __future__ import annotations

import argparse
import sys

from pipeline.cli import compare, costs, explain, gc, misc, perf, reproduce, verify
from pipeline.engine.errors import KilnError
from pipeline.engine.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = parser.add_subparsers(required=True, metavar="verb")
    for module in (explain, costs, compare, reproduce, gc, verify, misc, perf):
        module.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args, Settings.from_env()) or 0)
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
