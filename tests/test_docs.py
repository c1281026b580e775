"""The documentation stands alone: every relative link in the repository's Markdown files
resolves to a file of this repository (and to a heading that exists, when it names one),
and none leads outside it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SKIPPED_DIRS = {"build", "dist", "node_modules"}
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # https:, mailto:, ...
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def markdown_files() -> list[Path]:
    return sorted(path for path in REPO_ROOT.rglob("*.md")
                  if not any(part.startswith(".") or part in SKIPPED_DIRS or part.endswith(".egg-info")
                             for part in path.relative_to(REPO_ROOT).parts[:-1]))


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(match) for match in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8")))}


def test_anchor_follows_github() -> None:
    assert anchor("DeadLetter (`images.uploads.dlq`)") == "deadletter-imagesuploadsdlq"
    assert anchor("PDQ hex") == "pdq-hex"


@pytest.mark.parametrize("document", markdown_files(), ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_relative_links_resolve_inside_the_repository(document: Path) -> None:
    text = FENCE.sub("", document.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(text):
        if EXTERNAL.match(target):
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (document.parent / file_part).resolve() if file_part else document
        if not resolved.is_relative_to(REPO_ROOT):
            broken.append(f"{target}: outside the repository")
        elif not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: no heading #{fragment}")
    assert broken == []


def schema_names(node: object, found: set[str] | None = None) -> set[str]:
    """Every property name and every string enum / const value in a JSON Schema, nested ones included."""
    found = set() if found is None else found
    if isinstance(node, dict):
        if isinstance(node.get("properties"), dict):
            found.update(node["properties"])
        found.update(value for value in node.get("enum", []) if isinstance(value, str))
        if isinstance(node.get("const"), str):
            found.add(node["const"])
        for value in node.values():
            schema_names(value, found)
    elif isinstance(node, list):
        for value in node:
            schema_names(value, found)
    return found


@pytest.mark.parametrize("schema_file", sorted((REPO_ROOT / "common" / "schemas").glob("*.schema.json")),
                         ids=lambda path: path.name)
def test_contracts_page_explains_every_field_and_value(schema_file: Path) -> None:
    """docs/contracts.md is what producers and consumers in other languages read: every field and every
    allowed value of the normative schemas must appear there (as `code`)."""
    contracts = (REPO_ROOT / "docs" / "contracts.md").read_text(encoding="utf-8")
    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    assert sorted(name for name in schema_names(schema) if f"`{name}`" not in contracts) == []
