"""``modstream bank import/list/remove``: manage the hash banks every upload is checked against."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common.config import Settings


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    from common.banks import check_bank_name, import_rows, read_bank_file
    from common.kafkaio import ensure_topics
    from deploy.cli import _require_bootstrap

    check_bank_name(args.bank)
    rows = read_bank_file(Path(args.file), default_label=args.label)  # refuse a bad file before writing anything
    settings = _require_bootstrap(settings)
    ensure_topics(settings)
    count = import_rows(settings, args.bank, rows, args.action)
    print(f"imported {count} entries into bank {args.bank} (action {args.action})")
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from common.banks import read_banks
    from common.kafkaio import ensure_topics
    from deploy.cli import _require_bootstrap

    settings = _require_bootstrap(settings)
    ensure_topics(settings)
    counts = read_banks(settings).names()
    if not counts:
        print("no banks")
    for name, count in sorted(counts.items()):
        print(f"{name}\t{count} entries")
    return 0


def cmd_remove(args: argparse.Namespace, settings: Settings) -> int:
    from common.banks import remove_bank
    from common.kafkaio import ensure_topics
    from deploy.cli import _require_bootstrap

    settings = _require_bootstrap(settings)
    ensure_topics(settings)
    count = remove_bank(settings, args.bank)
    if not count:
        print(f"no bank named {args.bank}")
        return 1
    print(f"removed bank {args.bank} ({count} entries)")
    return 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    bank = sub.add_parser("bank", help="hash banks: lists of known MD5 / PDQ hashes checked before any model")
    bank_sub = bank.add_subparsers(dest="bank_command", required=True, metavar="SUBCOMMAND")
    load = bank_sub.add_parser(
        "import", parents=[common], help="add a bank's entries",
        description="Reads JSON lines ({\"pdq\": \"64 hex\"} or {\"md5\": \"32 hex\"}, optional \"label\" and "
                    "\"entry_id\") or CSV with the header kind,hash,label,entry_id, and adds them to bank NAME. "
                    "A malformed file is refused whole, naming the line. Running shards pick the entries up "
                    "within seconds.")
    load.add_argument("file")
    load.add_argument("--bank", required=True, help="bank name (letters, digits, '.', '_', '-')")
    load.add_argument("--label", choices=["adult", "normal"], default="adult",
                      help="label for rows that name none (default adult)")
    load.add_argument("--action", choices=["block", "review"], default="block",
                      help="what a match does (default block)")
    load.set_defaults(handler=cmd_import)
    listing = bank_sub.add_parser("list", parents=[common], help="print every bank and its entry count")
    listing.set_defaults(handler=cmd_list)
    remove = bank_sub.add_parser("remove", parents=[common], help="remove a bank (tombstones its entries)")
    remove.add_argument("bank")
    remove.set_defaults(handler=cmd_remove)
