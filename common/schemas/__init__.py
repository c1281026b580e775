"""JSON Schemas of the four messages, generated from ``common.messages`` and checked in
beside this file, so that producers and consumers outside Python validate against the
same contract. Regenerate with ``python -m common.schemas``; ``--check`` fails when stale."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.messages import MESSAGE_TYPES, SCHEMA_VERSION, _Message

SCHEMA_DIR = Path(__file__).resolve().parent
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def build_schema(message_cls: type[_Message]) -> dict[str, Any]:
    """The wire schema of one message type, with a stable ``$id`` naming type and version."""
    name = message_cls.schema_file.removesuffix(".schema.json")
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": f"urn:modstream:schema:{name}:{SCHEMA_VERSION}",
        **message_cls.model_json_schema(by_alias=True),
    }


def render_schema(message_cls: type[_Message]) -> str:
    """The exact text checked in for one message type (stable key order, trailing newline)."""
    return json.dumps(build_schema(message_cls), indent=2, ensure_ascii=False) + "\n"


def load_schema(message_cls: type[_Message]) -> dict[str, Any]:
    """The checked-in schema of one message type."""
    return json.loads((SCHEMA_DIR / message_cls.schema_file).read_text(encoding="utf-8"))


def stale_schema_files() -> list[Path]:
    """Checked-in schema files that are missing or differ from what the models generate."""
    stale = []
    for message_cls in MESSAGE_TYPES:
        path = SCHEMA_DIR / message_cls.schema_file
        if not path.is_file() or path.read_text(encoding="utf-8") != render_schema(message_cls):
            stale.append(path)
    return stale


def write_schemas() -> list[Path]:
    """Regenerate every schema file; returns the paths written."""
    written = []
    for message_cls in MESSAGE_TYPES:
        path = SCHEMA_DIR / message_cls.schema_file
        path.write_text(render_schema(message_cls), encoding="utf-8")
        written.append(path)
    return written
