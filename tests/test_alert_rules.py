"""deploy/prometheus/pairlb-alerts.yml: valid for Prometheus, unit-tested, and about pairlb.

``promtool check rules`` and ``promtool test rules`` (Debian's prometheus package) run the
rules against the series in pairlb-alerts.test.yml: each alert has a case that must fire and
a look-alike that must not. The rules may only name metrics pairlb exports (plus ``up``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from admin_helpers import ROOT, promql_metric_names

from lb.admin import metrics

RULES = ROOT / "deploy" / "prometheus" / "pairlb-alerts.yml"
TESTS = ROOT / "deploy" / "prometheus" / "pairlb-alerts.test.yml"
REQUIRED = {
    "PairlbNoMaster",
    "PairlbTlsCertificateExpiringSoon",
    "PairlbTlsCertificateExpired",
    "PairlbTwoMasters",
    "PairlbPeerNotHeard",
    "PairlbConfigDigestMismatch",
    "PairlbBackendDown",
    "PairlbPoolPanic",
    "PairlbHigh5xxRatio",
    "PairlbWorkerCrashLoop",
}

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool not installed")


def rules() -> dict[str, str]:
    """alert name -> expr, read from the YAML (block scalars included; no YAML library)."""
    out: dict[str, str] = {}
    lines = RULES.read_text().splitlines()
    name = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := re.match(r"\s*- alert:\s*(\S+)", line):
            name = m.group(1)
        elif (m := re.match(r"(\s*)expr:\s*(.*)$", line)) and name:
            indent, rest = len(m.group(1)), m.group(2).strip()
            if rest in ("|", ">", "|-", ">-"):
                body = []
                while i + 1 < len(lines) and (
                    not lines[i + 1].strip() or len(lines[i + 1]) - len(lines[i + 1].lstrip())
                    > indent
                ):
                    i += 1
                    body.append(lines[i].strip())
                rest = " ".join(body)
            out[name] = rest
        i += 1
    return out


@needs_promtool
@pytest.mark.timeout(60)
def test_promtool_check_rules() -> None:
    res = subprocess.run(
        [str(promtool), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(rules())} rules found" in res.stdout


@needs_promtool
@pytest.mark.timeout(60)
def test_promtool_unit_tests_pass() -> None:
    res = subprocess.run(
        [str(promtool), "test", "rules", TESTS.name],
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


@needs_promtool
@pytest.mark.timeout(60)
def test_a_broken_expectation_fails(tmp_path: Path) -> None:
    """The unit tests can fail: flip one expectation and promtool must say so."""
    (tmp_path / RULES.name).write_text(RULES.read_text())
    text = TESTS.read_text().replace('summary: "Pool web on lb1:9900 is in panic"',
                                     'summary: "Pool api on lb1:9900 is in panic"')
    (tmp_path / TESTS.name).write_text(text)
    res = subprocess.run(
        [str(promtool), "test", "rules", TESTS.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode != 0 and "PairlbPoolPanic" in res.stdout + res.stderr


def test_every_required_alert_exists_and_is_tested_firing() -> None:
    names = set(rules())
    assert names >= REQUIRED, REQUIRED - names
    tests = TESTS.read_text()
    for name in names:
        # Each alert has at least one case where it fires with labels.
        block = re.findall(
            rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels:", tests
        )
        assert block, f"{name} has no firing test case in {TESTS.name}"


def test_rules_name_only_metrics_pairlb_exports() -> None:
    declared = set(metrics.declared_names())
    for name, expr in rules().items():
        used = promql_metric_names(expr)
        assert used, f"{name}: no metric found in {expr!r}"
        unknown = {
            m for m in used if m != "up" and metrics.family_of(m) is None
        }
        assert not unknown, f"{name} uses metrics pairlb does not export: {unknown}"
        assert used - {"up"} <= declared | {
            f"{h}{s}" for h in declared for s in metrics.SAMPLE_SUFFIXES
        }
