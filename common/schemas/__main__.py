"""``python -m common.schemas [--check]``: regenerate the message schemas, or verify them."""

from __future__ import annotations

import argparse
import sys

from common.schemas import stale_schema_files, write_schemas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.schemas", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if a checked-in schema is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_schema_files()
        for path in stale:
            print(f"stale: {path}", file=sys.stderr)
        return 1 if stale else 0
    for path in write_schemas():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
