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


def test_the_hostile_input_table_names_tests_and_corpus_items_that_exist() -> None:
    """docs/reliability.md, "Hostile input": every test and corpus item it cites is there
    (``file.py::test``, ``::test`` for the file named last, corpus ``NNN-name`` or ``NNN-*``)."""
    import re

    text = (ROOT / "docs" / "reliability.md").read_text()
    marker = "<!-- kept by bench/chaos.py"
    assert marker in text, "the hostile-input section must follow chaos.py's keep marker"
    section = text[text.index(marker):]
    tests_dir = ROOT / "tests"
    current = ""
    cited = 0
    for cell in re.findall(r"`([^`]*)`", section):
        m = re.fullmatch(r"(?:(test_\w+\.py))?::(test_\w+)", cell)
        if m:
            current = m.group(1) or current
            assert current, cell
            assert f"def {m.group(2)}(" in (tests_dir / current).read_text(), cell
            cited += 1
    for row in re.findall(r"corpus ([^|]*)\|", section):
        for name in re.findall(r"`(\d{3}-[^`]*)`", row):
            assert list((tests_dir / "corpus" / "bad_requests").glob(name + ".http")), name
            cited += 1
    assert cited > 40


def test_chaos_rewrites_its_report_and_keeps_what_follows_the_marker(tmp_path: Path) -> None:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("chaos_docs", ROOT / "bench" / "chaos.py")
    assert spec is not None and spec.loader is not None
    chaos = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = chaos  # dataclasses look their module up
    spec.loader.exec_module(chaos)
    doc = tmp_path / "reliability.md"
    doc.write_text("# old report\n\n" + chaos.KEEP_MARKER + "\n\n# Hostile input\n\nkept\n")
    chaos.write_docs(chaos.Report(seed=1, duration_s=1.0, command="x"), doc)
    text = doc.read_text()
    assert "# old report" not in text and text.startswith("# Reliability: the chaos suite")
    assert text.endswith(chaos.KEEP_MARKER + "\n\n# Hostile input\n\nkept\n")
