"""lab.backend_app, the backend the suite starts hundreds of times, stays cheap to start: it
reads its address as lb.config does, without importing lb.config (a third of the start-up)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lab.backend_app import parse_address
from lb.config import parse_hostport

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value", [
    "127.0.0.1:80", "192.0.2.12:65535", "localhost:8080", "[::1]:8080", "[2001:db8::5]:1",
    "h:0", "h:65536", "h:", ":80", "h", "::1:80", "[::1]", "x:y", "",
])
def test_reads_an_address_as_lb_config_does(value: str) -> None:
    try:
        want: tuple[str, int] | None = parse_hostport(value)
    except ValueError:
        want = None
    if want is None:
        with pytest.raises(ValueError):
            parse_address(value)
    else:
        assert parse_address(value) == want


def test_the_backend_programs_do_not_import_lb_config() -> None:
    code = ("import sys, lab.backend_app, lab.node_rig, lab.pair; "
            "print(sorted(m for m in ('lb.config', 'pydantic', 'failover') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"
