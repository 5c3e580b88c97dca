#!/usr/bin/env bash
# Install pairlb as a systemd service: a virtualenv in /opt/pairlb, the unit, the sysctl
# drop-in, an example config, and the failover key and admin token (0600 root:root; an
# existing one keeps its content and gets that owner and mode back).
#
#   deploy/install.sh                      install or upgrade from this source tree, with
#                                          the proxy's hot path compiled (mypyc) if it can
#   deploy/install.sh --pure               ... as pure Python (no compiler needed)
#   deploy/install.sh --wheelhouse DIR     ... from wheels in DIR, offline (docs/operations.md)
#   deploy/install.sh --uninstall          remove what it installed; keep config, key, token
#   deploy/install.sh --uninstall --purge  ... and remove /etc/pairlb too
#   deploy/install.sh --root DIR ...       operate on DIR as if it were / (images, tests):
#                                          touches nothing outside DIR, runs no systemctl
#
# Idempotent: a second run with the same source changes no file (the venv is rebuilt only
# when the package sources, the build mode or the Python version differ from the last
# install; config, key and token are never overwritten). No user is created: the unit runs
# as a systemd DynamicUser and reads the key and token through LoadCredential=, so they
# stay readable by root only. It ends by saying which path the installed venv runs:
# compiled (lb.compiled_in_use()) or pure Python; a compiled build that fails (no C
# compiler, no Python headers) falls back to pure Python with a warning.
set -euo pipefail

DEPLOY_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SOURCE=$(cd "$DEPLOY_DIR/.." && pwd)
ROOT=/
PREFIX=/opt/pairlb
PYTHON=python3
WHEELHOUSE=
ACTION=install
PURGE=0
PURE=0
REBUILD=0

usage() {
    sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    cat <<EOF
Options:
  --root DIR        install into DIR instead of /            (default: /)
  --prefix DIR      virtualenv location                      (default: /opt/pairlb)
  --python PY       interpreter for the virtualenv (>= 3.11) (default: python3)
  --source DIR      pairlb source tree to install            (default: $SOURCE)
  --wheelhouse DIR  install pairlb and its dependencies from wheels in DIR, no index
  --pure            from source: skip the mypyc build, install the pure-Python path
  --rebuild         reinstall the venv even if nothing changed (e.g. after installing
                    a C compiler, to retry a compiled build that fell back)
  --uninstall       remove the installation (keeps config, key and token)
  --purge           with --uninstall: also remove /etc/pairlb
EOF
}

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "  $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
        --root=*) ROOT=${1#*=}; shift ;;
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
        --python=*) PYTHON=${1#*=}; shift ;;
        --source) SOURCE=${2:?--source needs a directory}; shift 2 ;;
        --source=*) SOURCE=${1#*=}; shift ;;
        --wheelhouse) WHEELHOUSE=${2:?--wheelhouse needs a directory}; shift 2 ;;
        --wheelhouse=*) WHEELHOUSE=${1#*=}; shift ;;
        --uninstall) ACTION=uninstall; shift ;;
        --purge) PURGE=1; shift ;;
        --pure) PURE=1; shift ;;
        --rebuild) REBUILD=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

case "$PREFIX" in /?*) ;; *) die "--prefix must be an absolute path (got '$PREFIX')" ;; esac
case "$PREFIX" in /|/usr|/usr/local|/opt|/etc|/var) die "--prefix $PREFIX: refusing a shared directory" ;; esac
[ -d "$ROOT" ] || die "--root $ROOT: no such directory"
ROOT=$(cd "$ROOT" && pwd)
R=${ROOT%/}                      # "" for the real root, so "$R/etc" is /etc
STAGED=0; [ -n "$R" ] && STAGED=1
if [ "$STAGED" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "run as root (or use --root DIR to stage into a directory)"
fi
[ "$PURGE" = 1 ] && [ "$ACTION" != uninstall ] && die "--purge only goes with --uninstall"
[ "$PURE$REBUILD" != 00 ] && [ "$ACTION" = uninstall ] && die "--pure and --rebuild go with an install"
# A wheel is installed as it was built: build it without PAIRLB_MYPYC=1 for a pure install.
[ "$PURE" = 1 ] && [ -n "$WHEELHOUSE" ] && die "--pure goes with an install from source, not --wheelhouse"

VENV=$R$PREFIX
ETC=$R/etc/pairlb
UNIT=$R/etc/systemd/system/pairlb.service
SYSCTL=$R/etc/sysctl.d/90-pairlb.conf
LOGROTATE=$R/etc/logrotate.d/pairlb
DOCDIR=$VENV/share/doc/pairlb
STAMP=$VENV/.pairlb-install
BUILD_LOG=$VENV/.pairlb-build.log  # kept only when a compiled build failed
MODE=compiled; [ "$PURE" = 1 ] && MODE=pure
WORK=
trap '[ -z "$WORK" ] || rm -rf "$WORK"' EXIT
SECRETS=(failover.key admin.token)
CHANGED=0

# systemctl only on the real root of a host that runs systemd.
systemd_running() { [ "$STAGED" = 0 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

# put SRC DST MODE: write DST only when its content or mode differs (keeps mtimes stable).
put() {
    local src=$1 dst=$2 mode=$3
    if [ -f "$dst" ] && cmp -s "$src" "$dst" && [ "$(stat -c %a "$dst")" = "${mode#0}" ]; then
        say "unchanged  ${dst#$R}"
        return
    fi
    install -D -m "$mode" "$src" "$dst"
    [ "$(id -u)" = 0 ] && chown 0:0 "$dst"
    say "installed  ${dst#$R}"
    CHANGED=1
}

# project_info PY FIELD: from the source's pyproject.toml, one a line: "packages" (the
# top-level package directories) or "build-requirements" (what a compiled build needs:
# setuptools, pairlb's dependencies, which mypyc type-checks against, and the test extra's
# mypy, the one ./dev compiles with).
project_info() {
    "$1" - "$SOURCE/pyproject.toml" "$2" <<'EOF'
import re, sys, tomllib
with open(sys.argv[1], "rb") as f:
    d = tomllib.load(f)
if sys.argv[2] == "packages":
    print("\n".join(sorted({p.split(".")[0] for p in d["tool"]["setuptools"]["packages"]})))
else:
    test = d["project"].get("optional-dependencies", {}).get("test", [])
    mypy = [r for r in test if re.match(r"mypy\s*([<>=!~;\[]|$)", r)] or ["mypy"]
    print("\n".join(d["build-system"]["requires"] + ["wheel"] + d["project"]["dependencies"] + mypy))
EOF
}

# The hash of what would be installed: decides whether the venv needs pip at all. From
# source it covers the build mode, and for a compiled build the exact Python version (a
# compiled build is valid for that one only: lb.source_digest()).
source_digest() {
    local py=$1 files=()
    if [ -z "$WHEELHOUSE" ]; then
        files=(pyproject.toml)
        [ -f "$SOURCE/setup.py" ] && files+=(setup.py)
        mapfile -t -O "${#files[@]}" files < <(project_info "$py" packages)
    fi
    if [ -n "$WHEELHOUSE" ]; then
        (cd "$WHEELHOUSE" && find . -maxdepth 1 -name '*.whl' -type f | LC_ALL=C sort | xargs -r sha256sum)
    else
        (cd "$SOURCE" && find "${files[@]}" -type f \
            \( -name '*.py' -o -name '*.toml' -o -name 'py.typed' -o -name '*.c' \) \
            -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum)
        echo "mode $MODE"
        [ "$MODE" = pure ] || "$py" -c 'import sys; print(sys.version)'
    fi | sha256sum | cut -d' ' -f1
    echo "$PREFIX"
}

# Which path the installed venv runs by default (the service's environment sets no
# PAIRLB_PURE_PYTHON): True for the compiled hot path.
compiled_in_use() {
    (cd / && env -u PAIRLB_PURE_PYTHON "$VENV/bin/python" -I -c 'import lb; print(lb.compiled_in_use())')
}

# build_compiled PY: a pairlb wheel with the hot path compiled, in $WORK/wheels.
# Why a throwaway build venv and a wheel, not `pip install --no-build-isolation` into the
# target venv: mypyc needs mypy and pairlb's dependencies at build time, and none of mypy,
# setuptools or wheel belong in the production venv; the venv is made from the same
# interpreter as the target (a compiled build is valid for that exact Python only); the
# result is the same artefact as the --wheelhouse route (PAIRLB_MYPYC=1 pip wheel), and a
# failure leaves the target venv as it was, so falling back to pure Python is clean. It
# builds from a clean copy of the sources ($WORK/src): nothing is written into --source,
# and no in-place build of a development tree (lb/data/*.so, build/) can leak in.
build_compiled() {
    local py=$1 bv=$WORK/buildenv
    "$py" -m venv "$bv" || return 1
    project_info "$py" build-requirements >"$WORK/build-requirements.txt" || return 1
    "$bv/bin/pip" install --quiet --disable-pip-version-check \
        -r "$WORK/build-requirements.txt" || return 1
    (cd "$WORK" && PAIRLB_MYPYC=1 "$bv/bin/pip" wheel --quiet --disable-pip-version-check \
        --no-build-isolation --no-deps --wheel-dir "$WORK/wheels" ./src) || return 1
    # setup.py writes lb/data/_native.sha256 only after a successful mypyc build.
    "$bv/bin/python" - "$WORK"/wheels/pairlb-*.whl <<'EOF' || return 1
import sys, zipfile
sys.exit(len(sys.argv) != 2 or "lb/data/_native.sha256" not in zipfile.ZipFile(sys.argv[1]).namelist())
EOF
}

# install_from_source PY: compiled if it can (unless --pure), else pure Python.
install_from_source() {
    local py=$1 pkg
    WORK=$(mktemp -d)
    mkdir "$WORK/src"
    local files=(pyproject.toml)
    for f in setup.py README.md; do [ -f "$SOURCE/$f" ] && files+=("$f"); done
    for pkg in $(project_info "$py" packages); do files+=("$pkg"); done
    (cd "$SOURCE" && tar cf - --exclude=__pycache__ --exclude='*.so' --exclude='*.egg-info' \
        --exclude=_native.sha256 "${files[@]}") | tar xf - -C "$WORK/src"
    if [ "$MODE" = compiled ]; then
        say "building   the proxy's hot path with mypyc (a minute or two; --pure skips it)"
        if build_compiled "$py" >"$WORK/build.log" 2>&1; then
            local whl=("$WORK"/wheels/pairlb-*.whl)
            "$VENV/bin/pip" install --quiet --disable-pip-version-check "${whl[0]}"
            # Same version number, new build: put pairlb itself in again (not its dependencies).
            "$VENV/bin/pip" install --quiet --disable-pip-version-check \
                --force-reinstall --no-deps "${whl[0]}"
            rm -f "$BUILD_LOG"
            return
        fi
        cp "$WORK/build.log" "$BUILD_LOG"
        echo "install.sh: warning: the compiled build failed (no C compiler or Python headers?" \
            "see ${BUILD_LOG#$R}): installing the pure-Python path instead, the same code at" \
            "about 15 % more CPU per request; install gcc and python3-dev, then run again" \
            "with --rebuild" >&2
    else
        rm -f "$BUILD_LOG"  # --pure: an earlier failed build is no longer the reason
    fi
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "$WORK/src"
}

install_venv() {
    local py
    py=$(command -v "$PYTHON") || die "--python $PYTHON: not found"
    "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$py is older than Python 3.11"
    # ProtectHome=yes hides /home, /root and /run/user from the service: a venv whose
    # interpreter lives there (pyenv, a user's build) cannot start under the unit.
    case "$(readlink -f "$py")" in
        /home/*|/root/*|/run/user/*)
            if [ "$STAGED" = 0 ]; then
                die "$py resolves to $(readlink -f "$py"), which the unit's ProtectHome=yes hides; use --python /usr/bin/python3"
            fi
            echo "install.sh: warning: $(readlink -f "$py") is hidden from the service by ProtectHome=yes" >&2 ;;
    esac
    if [ -n "$WHEELHOUSE" ]; then
        [ -d "$WHEELHOUSE" ] || die "--wheelhouse $WHEELHOUSE: no such directory"
        WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
    else
        [ -f "$SOURCE/pyproject.toml" ] || die "--source $SOURCE: no pyproject.toml there"
        SOURCE=$(cd "$SOURCE" && pwd)
    fi
    local digest
    digest=$(source_digest "$py")
    if [ "$REBUILD" = 0 ] && [ -x "$VENV/bin/pairlb" ] && [ -f "$STAMP" ] \
            && [ "$(cat "$STAMP")" = "$digest" ]; then
        say "unchanged  ${VENV#$R} (same sources as the last install)"
        report_hot_path
        return
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        "$py" -m venv "$VENV"
        say "created    ${VENV#$R} (virtualenv, $("$VENV/bin/python" -V))"
    fi
    if [ -n "$WHEELHOUSE" ]; then
        "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-index \
            --find-links "$WHEELHOUSE" --upgrade pairlb
        # Same version number, new build (the digest above changed): --upgrade keeps the old
        # files, so put pairlb itself in again (its dependencies stay as they are).
        "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-index \
            --find-links "$WHEELHOUSE" --force-reinstall --no-deps pairlb
    else
        install_from_source "$py"
    fi
    printf '%s\n' "$digest" >"$STAMP"
    say "installed  ${VENV#$R} ($("$VENV/bin/pairlb" version))"
    CHANGED=1
    report_hot_path
}

report_hot_path() {
    local data
    if [ "$(compiled_in_use)" = True ]; then
        say "hot path   compiled (mypyc): lb.compiled_in_use() is True"
        return
    fi
    say "hot path   pure Python: lb.compiled_in_use() is False"
    if [ -n "$WHEELHOUSE" ]; then
        data=$("$VENV/bin/python" -I -c 'import os, lb; print(os.path.dirname(lb.__file__))')/data
        if compgen -G "$data/_native__mypyc.*" >/dev/null; then
            echo "install.sh: warning: the wheel's compiled modules do not match this install" \
                "(built by another Python version than $("$VENV/bin/python" -V 2>&1)?):" \
                "running pure Python" >&2
        fi
    elif [ "$MODE" = compiled ] && [ -f "$BUILD_LOG" ]; then
        say "           (the compiled build failed: ${BUILD_LOG#$R}; --rebuild retries it)"
    elif [ "$MODE" = compiled ]; then
        echo "install.sh: warning: the compiled build succeeded but the venv does not use it" >&2
    fi
}

install_secret() {
    local f=$ETC/$1 mode owner kept=1
    if [ -e "$f" ]; then
        # Owner first: a key owned by another user (a copy made with scp as that user, a
        # tarball unpacked elsewhere) is theirs to read or replace, whatever its mode.
        owner=$(stat -c %u:%g "$f")
        if [ "$(id -u)" = 0 ] && [ "$owner" != 0:0 ]; then
            chown 0:0 "$f"
            say "fixed owner ${f#$R} (was uid:gid $owner; root only)"
            CHANGED=1; kept=0
        fi
        mode=$(stat -c %a "$f")
        if [ $((8#$mode & 8#077)) != 0 ]; then
            chmod 0600 "$f"
            say "tightened  ${f#$R} (was mode $mode; group/others must not read it)"
            CHANGED=1; kept=0
        fi
        [ "$kept" = 0 ] || say "kept       ${f#$R}"
        return
    fi
    "$VENV/bin/pairlb" keygen "$f" >/dev/null
    [ "$(id -u)" = 0 ] && chown 0:0 "$f"
    say "created    ${f#$R} (mode 0600, root only; systemd hands it to the service)"
    CHANGED=1
}

do_install() {
    echo "Installing pairlb into ${R:-/} (venv ${PREFIX}):"
    install_venv
    local tmp
    tmp=$(mktemp)
    sed "s#/opt/pairlb#$PREFIX#g" "$DEPLOY_DIR/systemd/pairlb.service" >"$tmp"
    put "$tmp" "$UNIT" 0644
    rm -f "$tmp"
    put "$DEPLOY_DIR/sysctl/90-pairlb.conf" "$SYSCTL" 0644
    put "$DEPLOY_DIR/logrotate/pairlb" "$LOGROTATE" 0644
    if [ -f "$SOURCE/docs/operations.md" ]; then
        put "$SOURCE/docs/operations.md" "$DOCDIR/operations.md" 0644
    fi
    if [ ! -d "$ETC" ]; then
        install -d -m 0755 "$ETC"
        CHANGED=1
    fi
    # Certificates and keys for [listener.tls]; the unit stages them for its user.
    [ -d "$ETC/tls" ] || install -d -m 0700 "$ETC/tls"
    put "$DEPLOY_DIR/pairlb.toml" "$ETC/pairlb.toml.example" 0644
    if [ -e "$ETC/pairlb.toml" ]; then
        say "kept       ${ETC#$R}/pairlb.toml"
    else
        put "$DEPLOY_DIR/pairlb.toml" "$ETC/pairlb.toml" 0644
    fi
    for s in "${SECRETS[@]}"; do install_secret "$s"; done
    "$VENV/bin/pairlb" check-config -q "$ETC/pairlb.toml" \
        || echo "install.sh: warning: ${ETC#$R}/pairlb.toml does not validate (see above)" >&2
    if systemd_running && [ "$CHANGED" = 1 ]; then
        systemctl daemon-reload
        say "ran        systemctl daemon-reload"
    fi
    [ "$CHANGED" = 1 ] || echo "Nothing to do: already installed."
    cat <<EOF

Next steps (docs/operations.md has the whole procedure for a pair):
  1. Edit /etc/pairlb/pairlb.toml: node.name, listeners, pools; [failover] for a pair.
     Check it:            $PREFIX/bin/pairlb check-config /etc/pairlb/pairlb.toml
  2. For a pair, use ONE key on both nodes: copy /etc/pairlb/failover.key from the first
     node to the second (scp -p, then chmod 600, owner root).
  3. Apply the kernel settings now (they apply at boot anyway):
                          sysctl -p /etc/sysctl.d/90-pairlb.conf
  4. Start it:            systemctl enable --now pairlb
     Watch it:            systemctl status pairlb; journalctl -u pairlb -f
     Its status page:     curl -s http://127.0.0.1:9900/status
  Admin token (for drain/enable/switchover): /etc/pairlb/admin.token
EOF
    if ! command -v nft >/dev/null 2>&1; then
        echo "  Note: 'nft' (Debian package nftables) is missing: a planned VIP move would reset"
        echo "        connections still open on the old node (see docs/operations.md)."
    fi
}

do_uninstall() {
    echo "Uninstalling pairlb from ${R:-/}:"
    if systemd_running && systemctl cat pairlb.service >/dev/null 2>&1; then
        systemctl disable --now pairlb.service || true
        say "ran        systemctl disable --now pairlb.service"
    fi
    for f in "$UNIT" "$SYSCTL" "$LOGROTATE" "$ETC/pairlb.toml.example"; do
        if [ -e "$f" ]; then rm -f "$f"; say "removed    ${f#$R}"; fi
    done
    if [ -d "$VENV" ]; then
        # Only a directory this script made: never rm -rf an arbitrary --prefix.
        [ -f "$STAMP" ] || [ -f "$VENV/pyvenv.cfg" ] \
            || die "${VENV#$R} is not a pairlb virtualenv; not removing it"
        rm -rf "$VENV"
        say "removed    ${VENV#$R}"
    fi
    if [ "$PURGE" = 1 ]; then
        for f in "$ETC/pairlb.toml" "${SECRETS[@]/#/$ETC/}"; do
            if [ -e "$f" ]; then rm -f "$f"; say "removed    ${f#$R}"; fi
        done
        if [ -d "$ETC/tls" ] && ! rmdir "$ETC/tls" 2>/dev/null; then
            say "left       ${ETC#$R}/tls (it holds certificates or keys)"
        fi
        if [ -d "$ETC" ]; then
            if rmdir "$ETC" 2>/dev/null; then
                say "removed    ${ETC#$R}"
            else
                say "left       ${ETC#$R} (it holds files this script did not install)"
            fi
        fi
    else
        for f in "$ETC/pairlb.toml" "${SECRETS[@]/#/$ETC/}"; do
            [ -e "$f" ] && say "kept       ${f#$R} (--purge removes it)"
        done
    fi
    if systemd_running; then
        systemctl daemon-reload
        say "ran        systemctl daemon-reload"
    fi
    echo "The sysctl values stay in force until the next boot."
}

if [ "$ACTION" = install ]; then do_install; else do_uninstall; fi
