"""Docs stay true to the code: the configuration reference is the generated one."""

from __future__ import annotations

from pathlib import Path

from lb.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_current() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    begin = "<!-- BEGIN GENERATED REFERENCE -->\n"
    end = "<!-- END GENERATED REFERENCE -->"
    generated = text.split(begin, 1)[1].split(end, 1)[0]
    assert generated.strip() == reference_markdown().strip(), (
        "docs/configuration.md is stale: regenerate with python -m lb.config --reference"
    )
