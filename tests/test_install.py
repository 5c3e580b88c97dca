"""deploy/install.sh into a temporary root, and the example config it ships.

The install is real: a virtualenv with pairlb and its dependencies from the package index,
`pairlb keygen` for the key and token, the proxy's hot path compiled by mypyc (install.sh's
own build for the module's shared install, and the wheel route built in the suite's venv,
which has mypy: C at -O0, ~30 s each). It runs from a snapshot of the source tree (other
work in this checkout must not change the sources between the first and the second run) and
with `--root`, so nothing outside the temporary directory is touched; the test checks that
the host's /etc/passwd, /etc/group and /etc/pairlb are as they were.

The example config deploy/pairlb.toml is checked against lb/config.py's models: every key
of every model appears in its section, every commented default equals the model's default,
and the file validates both as shipped and with every commented line switched on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tomllib
import types
import typing
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from tls_helpers import Pki

import failover
from lb import config as config_mod

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "deploy" / "pairlb.toml"
PREFIX = "/opt/pairlb-test"
"""Not the default, so the test also proves the unit's paths follow --prefix."""
SECRETS = ("failover.key", "admin.token")


def _no_c_compiler() -> str:
    """Why a compiled build cannot work here ("" when it can): the compiler setuptools
    would use (CC, else sysconfig's) and the interpreter's headers."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc} not found): install.sh falls back to pure Python"
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        return "no Python.h for this interpreter: install.sh falls back to pure Python"
    return ""


NO_C_COMPILER = _no_c_compiler()
BUILD_ENV = {"PAIRLB_MYPYC_OPT": "0"}
"""mypyc's C at -O0 in these tests: the same modules compiled, ~15 s less per build (what is
checked is which path runs, not its speed)."""


# -- the example config ----------------------------------------------------------------------


def _unwrap(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(model class, is-array) for a field that is a sub-table, else (None, False)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else (None, False)
    if origin is tuple:
        inner, _ = _unwrap(typing.get_args(annotation)[0])
        return (inner, True) if inner is not None else (None, False)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def model_sections() -> dict[str, tuple[type[BaseModel], bool]]:
    """Every table of the config format, derived from the models: 'pool.backends.health'..."""
    out: dict[str, tuple[type[BaseModel], bool]] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            sub, array = _unwrap(f.annotation)
            if sub is not None:
                path = f"{prefix}{name}"
                out[path] = (sub, array)
                walk(sub, path + ".")

    walk(config_mod.Config, "")
    return out


_HEADER = re.compile(r"^#?(\[\[?)([a-z_.]+)\]\]?\s*$")
_SETTING = re.compile(r"^(#?)([a-z0-9_]+) = (.+)$")


def example_blocks(text: str) -> dict[str, list[tuple[bool, str, str]]]:
    """section -> [(commented, key, value)], over every occurrence of that section header."""
    blocks: dict[str, list[tuple[bool, str, str]]] = {}
    current = ""
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h:
            current = h.group(2)
            blocks.setdefault(current, [])
            continue
        s = _SETTING.match(line)
        if s:
            blocks.setdefault(current, []).append((s.group(1) == "#", s.group(2), s.group(3)))
    return blocks


def test_example_config_lists_every_key_of_every_model() -> None:
    sections = model_sections()
    assert {
        "node",
        "listener",
        "pool",
        "pool.backends",
        "pool.backends.health",
        "pool.health",
        "pool.passive",
        "failover",
        "admin",
        "logging",
    } <= set(sections)
    blocks = example_blocks(EXAMPLE.read_text())
    missing = []
    for path, (model, _) in sections.items():
        assert path in blocks, f"section [{path}] is missing"
        keys = {k for _, k, _ in blocks[path]}
        for name, f in model.model_fields.items():
            if _unwrap(f.annotation)[0] is not None:
                continue  # a sub-table: its own header is checked above
            if name not in keys:
                missing.append(f"{path}.{name}")
        stray = keys - set(model.model_fields)
        assert not stray, f"[{path}] has keys the model does not know: {stray}"
    assert not missing, f"keys not in deploy/pairlb.toml: {missing}"


# Deliberate differences from the model default, each with its reason in the file itself.
NOT_THE_DEFAULT = {
    # The unit hands the key over as a credential; the model's default is the file on disk.
    ("failover", "key_file"),
    # The commented TCP listener that shows sni_routes (its own [[listener]] block).
    ("listener", "mode"),
}


def test_commented_values_are_the_real_defaults() -> None:
    """'#key = value' means 'the default is value': it must not drift from lb/config.py."""
    sections = model_sections()
    wrong = []
    for path, entries in example_blocks(EXAMPLE.read_text()).items():
        if path not in sections:
            continue
        model = sections[path][0]
        for commented, key, raw in entries:
            f = model.model_fields[key]
            if not commented or f.is_required() or (path, key) in NOT_THE_DEFAULT:
                continue
            default = f.get_default(call_default_factory=True)
            if default is None:
                continue  # an example value for an optional setting; the prose says so
            shown = tomllib.loads(f"v = {raw}")["v"]
            if json.loads(json.dumps(default)) != shown:
                wrong.append(f"{path}.{key}: file says {shown!r}, model default {default!r}")
    assert not wrong, wrong


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lb", "check-config", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=60,
    )


@pytest.mark.timeout(90)
def test_example_config_passes_check_config_as_shipped() -> None:
    res = _check_config(EXAMPLE)
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout


@pytest.mark.timeout(90)
def test_example_config_passes_with_every_commented_setting_switched_on(tmp_path: Path) -> None:
    """Every commented line is a valid setting in the right place (unknown keys are errors)."""
    on = re.sub(r"(?m)^#(\[|[a-z0-9_]+ = )", r"\1", EXAMPLE.read_text())
    # The TLS files it names must exist for check-config (it reads them): real test ones.
    leaf = Pki(tmp_path / "pki").leaf("example", ["www.example.com"])
    ticket = tmp_path / "ticket.key"
    ticket.write_text(os.urandom(80).hex())
    ticket.chmod(0o600)
    for shown, real in (("/run/pairlb/tls/example.pem", leaf.cert),
                        ("/run/pairlb/tls/example.key", leaf.key),
                        ("/run/pairlb/tls/ticket.key", ticket),
                        ("/etc/pairlb/backend-ca.pem", tmp_path / "pki" / "ca.pem")):
        assert shown in on
        on = on.replace(shown, str(real))
    path = tmp_path / "all-on.toml"
    path.write_text(on)
    res = _check_config(path)
    assert res.returncode == 0, res.stderr
    cfg = config_mod.load(path)
    assert cfg.failover is not None and cfg.pool[0].backends[1].health is not None


@pytest.mark.timeout(90)
def test_check_config_rejects_a_broken_copy_of_the_example(tmp_path: Path) -> None:
    """The two tests above can fail: a typo in a key is reported with its dotted path."""
    path = tmp_path / "typo.toml"
    path.write_text(EXAMPLE.read_text().replace("#retries = 2", "retry = 2"))
    res = _check_config(path)
    assert res.returncode == 2
    assert "pool[0].retry: unknown key" in res.stderr


# -- install.sh into a temporary root --------------------------------------------------------


def _snapshot_source(dst: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("lb", "healthcheck", "failover", "lab", "deploy", "docs"):
        if (REPO / name).exists():
            shutil.copytree(REPO / name, dst / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    return dst


def _host_state() -> dict[str, str]:
    """What a careless installer would change on the real system."""
    out = {}
    for p in ("/etc/passwd", "/etc/group", "/etc/shadow"):
        if os.path.exists(p):
            out[p] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    for p in ("/etc/pairlb", "/etc/systemd/system/pairlb.service", PREFIX):
        out[p] = str(os.path.exists(p))
    return out


def tree_state(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every path under root with type, mode, owner, size, mtime and content hash."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = ""
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                digest = os.readlink(p)
            mtime = st.st_mtime_ns if not stat.S_ISDIR(st.st_mode) else 0
            out[str(p.relative_to(root))] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                mtime,
                digest,
            )
    return out


class Install:
    def __init__(self, src: Path, root: Path) -> None:
        self.src = src
        self.root = root
        self.runs: list[subprocess.CompletedProcess[str]] = []

    def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [
                "bash",
                str(self.src / "deploy" / "install.sh"),
                "--root",
                str(self.root),
                "--prefix",
                PREFIX,
                "--python",
                sys.executable,
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=540,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | BUILD_ENV
            | (env or {}),
        )
        self.runs.append(res)
        return res

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")

    def hot_path(self) -> dict[str, Any]:
        """What the installed venv runs, asked the way the service would import it."""
        code = (
            "import importlib.util, json, os, lb\n"
            "rec = os.path.join(os.path.dirname(lb.__file__), 'data', '_native.sha256')\n"
            "data = os.path.dirname(rec)\n"
            "print(json.dumps({'compiled': lb.compiled_in_use(),\n"
            "    'digest_matches': os.path.exists(rec)\n"
            "        and open(rec).read().strip() == lb.source_digest(),\n"
            "    'group_so': any(f.startswith('_native__mypyc.') for f in os.listdir(data)),\n"
            "    'mypy': importlib.util.find_spec('mypy') is not None}))\n"
        )
        res = subprocess.run(
            [str(self.path(f"{PREFIX}/bin/python")), "-I", "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
            env={k: v for k, v in os.environ.items()
                 if k not in ("PYTHONPATH", "PAIRLB_PURE_PYTHON")},
        )
        assert res.returncode == 0, res.stderr
        out: dict[str, Any] = json.loads(res.stdout)
        return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    base = tmp_path_factory.mktemp("install")
    src = _snapshot_source(base / "src")
    root = base / "root"
    root.mkdir()
    host_before = _host_state()
    inst = Install(src, root)
    res = inst.run()
    assert res.returncode == 0, res.stdout + res.stderr
    yield inst
    assert _host_state() == host_before, "install.sh changed the host outside --root"


@pytest.mark.timeout(600)
def test_install_puts_every_file_in_place_with_safe_modes(installed: Install) -> None:
    out = installed.runs[0].stdout
    assert "Next steps" in out and "systemctl enable --now pairlb" in out
    expect = {
        "/etc/systemd/system/pairlb.service": 0o644,
        "/etc/sysctl.d/90-pairlb.conf": 0o644,
        "/etc/logrotate.d/pairlb": 0o644,
        "/etc/pairlb/pairlb.toml": 0o644,
        "/etc/pairlb/pairlb.toml.example": 0o644,
        "/etc/pairlb/failover.key": 0o600,
        "/etc/pairlb/admin.token": 0o600,
        f"{PREFIX}/share/doc/pairlb/operations.md": 0o644,
    }
    for p, mode in expect.items():
        st = installed.path(p).stat()
        assert stat.S_IMODE(st.st_mode) == mode, f"{p}: {oct(st.st_mode)}"
        if os.geteuid() == 0:
            assert (st.st_uid, st.st_gid) == (0, 0), p
    assert stat.S_IMODE(installed.path("/etc/pairlb").stat().st_mode) == 0o755
    # The config starts as the example; the unit follows --prefix everywhere.
    assert installed.path("/etc/pairlb/pairlb.toml").read_text() == EXAMPLE.read_text()
    unit = installed.path("/etc/systemd/system/pairlb.service").read_text()
    assert "/opt/pairlb/" not in unit
    assert f"ExecStart={PREFIX}/bin/pairlb run -c /etc/pairlb/pairlb.toml" in unit
    # The key is what the failover code loads, and the token is not the key.
    key = failover.load_key(str(installed.path("/etc/pairlb/failover.key")))
    assert len(key) >= 16
    token = installed.path("/etc/pairlb/admin.token").read_text().strip()
    assert len(token) >= 32 and bytes.fromhex(token) != key


@pytest.mark.timeout(120)
def test_the_installed_venv_runs_what_the_unit_runs(installed: Install, tmp_path: Path) -> None:
    exe = installed.path(f"{PREFIX}/bin/pairlb")
    conf = installed.path("/etc/pairlb/pairlb.toml")
    res = subprocess.run(
        [str(exe), "check-config", "-q", str(conf)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr  # ExecStartPre= and the first ExecReload=
    res = subprocess.run([str(exe), "version"], capture_output=True, text=True, timeout=60)
    assert res.stdout.startswith("pairlb ")
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    # verify needs the Exec binaries to exist: point the installed unit at the staged venv.
    unit = installed.path("/etc/systemd/system/pairlb.service").read_text()
    copy = tmp_path / "pairlb.service"
    copy.write_text(unit.replace(f"{PREFIX}/bin/", f"{installed.path(PREFIX)}/bin/"))
    res = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, cwd="/tmp"
    )
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr


@pytest.mark.timeout(120)
def test_the_source_install_runs_the_compiled_hot_path(installed: Install) -> None:
    first = installed.runs[0]
    if NO_C_COMPILER:
        assert "the compiled build failed" in first.stderr  # a warning, not a failed install
        pytest.skip(NO_C_COMPILER)
    assert "hot path   compiled (mypyc): lb.compiled_in_use() is True" in first.stdout, (
        first.stdout + first.stderr)
    # The wheel's own record matches its .py files in site-packages; the build tools stayed
    # in the throwaway build venv.
    assert installed.hot_path() == {
        "compiled": True, "digest_matches": True, "group_so": True, "mypy": False}
    assert not installed.path(f"{PREFIX}/.pairlb-build.log").exists()


@pytest.mark.timeout(600)
def test_a_second_run_changes_nothing(installed: Install) -> None:
    before = tree_state(installed.root)
    res = installed.run()
    assert res.returncode == 0, res.stderr
    assert "Nothing to do: already installed." in res.stdout
    assert "hot path   " in res.stdout  # it still says which path runs
    after = tree_state(installed.root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert changed == []


@pytest.mark.timeout(600)
def test_a_rerun_keeps_the_operators_config_and_tightens_a_loose_key(installed: Install) -> None:
    conf = installed.path("/etc/pairlb/pairlb.toml")
    edited = conf.read_text().replace('name = "lb1"', 'name = "lb2"')
    conf.write_text(edited)
    key = installed.path("/etc/pairlb/failover.key")
    key_bytes = key.read_bytes()
    key.chmod(0o644)
    res = installed.run()
    assert res.returncode == 0, res.stderr
    assert conf.read_text() == edited
    assert key.read_bytes() == key_bytes  # never regenerated: the peer has this key
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "tightened  /etc/pairlb/failover.key (was mode 644" in res.stdout


@pytest.mark.timeout(600)
@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away and take it back")
def test_a_rerun_gives_an_existing_secret_back_to_root(installed: Install) -> None:
    """A secret another user owns (copied with scp as that user, unpacked from a tarball)
    is theirs to read or replace whatever its mode: the rerun makes it root's again, keeps
    its content, and says so. Owner and mode are fixed together."""
    key = installed.path("/etc/pairlb/failover.key")
    token = installed.path("/etc/pairlb/admin.token")
    before = {p: p.read_bytes() for p in (key, token)}
    os.chown(key, 65534, 65534)  # nobody:nogroup, mode still 0600
    os.chown(token, 0, 65534)  # root, but group nogroup, and group-readable
    token.chmod(0o640)
    res = installed.run()
    assert res.returncode == 0, res.stderr
    for p in (key, token):
        st = p.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600), p
        assert p.read_bytes() == before[p]  # never regenerated
    assert "fixed owner /etc/pairlb/failover.key (was uid:gid 65534:65534; root only)" \
        in res.stdout
    assert "fixed owner /etc/pairlb/admin.token (was uid:gid 0:65534; root only)" in res.stdout
    assert "tightened  /etc/pairlb/admin.token (was mode 640" in res.stdout
    # And a further run has nothing left to fix.
    res = installed.run()
    assert "kept       /etc/pairlb/failover.key" in res.stdout
    assert "kept       /etc/pairlb/admin.token" in res.stdout


@pytest.mark.timeout(600)
def test_a_failed_compiled_build_falls_back_to_pure_and_pure_skips_the_build(
    installed: Install, tmp_path: Path
) -> None:
    """A compiled build that fails: a warning and a pure install, not a failure; not retried
    for the same sources. --pure never builds, and clears the failed build's log.

    The failure is provoked where it is cheap: a pip constraint no mypy meets, so the build
    venv cannot be set up (the target venv needs no mypy). A missing compiler (CC=/bin/false)
    takes the same branch of install.sh, but only after mypyc's type check (~30 s more)."""
    root = tmp_path / "root"
    root.mkdir()
    inst = Install(installed.src, root)
    no_mypy = tmp_path / "no-mypy.txt"
    no_mypy.write_text("mypy<0.1\n")
    res = inst.run(env={"PIP_CONSTRAINT": str(no_mypy)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "install.sh: warning: the compiled build failed" in res.stderr
    assert "hot path   pure Python: lb.compiled_in_use() is False" in res.stdout
    assert inst.hot_path()["compiled"] is False
    log = inst.path(f"{PREFIX}/.pairlb-build.log")
    assert log.exists()
    res = inst.run()
    assert "Nothing to do: already installed." in res.stdout
    assert "--rebuild retries it" in res.stdout

    res = inst.run("--pure")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "building" not in res.stdout and "warning: the compiled" not in res.stderr
    assert "hot path   pure Python: lb.compiled_in_use() is False" in res.stdout
    assert inst.hot_path() == {
        "compiled": False, "digest_matches": False, "group_so": False, "mypy": False}
    assert not log.exists()
    assert "Nothing to do: already installed." in inst.run("--pure").stdout


@pytest.mark.timeout(600)
@pytest.mark.skipif(bool(NO_C_COMPILER), reason=NO_C_COMPILER or "-")
def test_a_wheel_built_with_pairlb_mypyc_installs_compiled(
    installed: Install, tmp_path: Path
) -> None:
    """The wheel route as docs/operations.md gives it: a venv with mypy, wheel and pairlb's
    dependencies (the test suite's own: ./dev puts them there), `PAIRLB_MYPYC=1 pip wheel
    --no-build-isolation`, install.sh --wheelhouse."""
    src = shutil.copytree(installed.src, tmp_path / "src")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check"]
    wheels = tmp_path / "wheels"
    res = subprocess.run(
        [*pip, "wheel", "--no-build-isolation", str(src), "-w", str(wheels)],
        timeout=400, env=env | BUILD_ENV | {"PAIRLB_MYPYC": "1"}, capture_output=True, text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    (whl,) = wheels.glob("pairlb-*.whl")
    assert not whl.name.endswith("-none-any.whl")  # a platform wheel
    names = zipfile.ZipFile(whl).namelist()
    assert "lb/data/_native.sha256" in names
    assert any(n.startswith("lb/data/_native__mypyc.") for n in names)

    root = tmp_path / "root"
    root.mkdir()
    inst = Install(installed.src, root)
    res = inst.run("--wheelhouse", str(wheels))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "hot path   compiled (mypyc): lb.compiled_in_use() is True" in res.stdout
    assert inst.hot_path() == {
        "compiled": True, "digest_matches": True, "group_so": True, "mypy": False}


@pytest.mark.timeout(600)
def test_uninstall_removes_what_it_installed_but_keeps_config_and_secrets(
    installed: Install,
) -> None:
    secrets_before = {s: installed.path(f"/etc/pairlb/{s}").read_bytes() for s in SECRETS}
    res = installed.run("--uninstall")
    assert res.returncode == 0, res.stderr
    files = sorted(
        str(p.relative_to(installed.root)) for p in installed.root.rglob("*") if not p.is_dir()
    )
    assert files == ["etc/pairlb/admin.token", "etc/pairlb/failover.key", "etc/pairlb/pairlb.toml"]
    for s in SECRETS:
        assert installed.path(f"/etc/pairlb/{s}").read_bytes() == secrets_before[s]
    assert "kept       /etc/pairlb/failover.key (--purge removes it)" in res.stdout

    res = installed.run("--uninstall", "--purge")
    assert res.returncode == 0, res.stderr
    assert [p for p in installed.root.rglob("*") if not p.is_dir()] == []
    assert not installed.path("/etc/pairlb").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--purge"], "--purge only goes with --uninstall"),
        (["--prefix", "/usr"], "refusing a shared directory"),
        (["--prefix", "relative"], "must be an absolute path"),
        (["--bogus"], "unknown option: --bogus"),
        (["--pure", "--wheelhouse", "/nonexistent"], "--pure goes with an install from source"),
        (["--uninstall", "--pure"], "--pure and --rebuild go with an install"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(
    tmp_path: Path, args: list[str], message: str
) -> None:
    res = subprocess.run(
        ["bash", str(REPO / "deploy" / "install.sh"), "--root", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode != 0
    assert message in res.stderr
    assert list(tmp_path.iterdir()) == []
