#!/usr/bin/env bash
# Install pairlb as a systemd service: a virtualenv in /opt/pairlb, the unit, the sysctl
# drop-in, an example config, and the failover key and admin token (0600 root:root; an
# existing one keeps its content and gets that owner and mode back).
#
#   deploy/install.sh                      install or upgrade from this source tree
#   deploy/install.sh --wheelhouse DIR     ... from wheels in DIR, offline (pip wheel . -w DIR)
#   deploy/install.sh --uninstall          remove what it installed; keep config, key, token
#   deploy/install.sh --uninstall --purge  ... and remove /etc/pairlb too
#   deploy/install.sh --root DIR ...       operate on DIR as if it were / (images, tests):
#                                          touches nothing outside DIR, runs no systemctl
#
# Idempotent: a second run with the same source changes no file (the venv is rebuilt only
# when the package sources differ from the last install; config, key and token are never
# overwritten). No user is created: the unit runs as a systemd DynamicUser and reads the
# key and token through LoadCredential=, so they stay readable by root only.
set -euo pipefail

DEPLOY_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SOURCE=$(cd "$DEPLOY_DIR/.." && pwd)
ROOT=/
PREFIX=/opt/pairlb
PYTHON=python3
WHEELHOUSE=
ACTION=install
PURGE=0

usage() {
    sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    cat <<EOF
Options:
  --root DIR        install into DIR instead of /            (default: /)
  --prefix DIR      virtualenv location                      (default: /opt/pairlb)
  --python PY       interpreter for the virtualenv (>= 3.11) (default: python3)
  --source DIR      pairlb source tree to install            (default: $SOURCE)
  --wheelhouse DIR  install pairlb and its dependencies from wheels in DIR, no index
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

VENV=$R$PREFIX
ETC=$R/etc/pairlb
UNIT=$R/etc/systemd/system/pairlb.service
SYSCTL=$R/etc/sysctl.d/90-pairlb.conf
LOGROTATE=$R/etc/logrotate.d/pairlb
DOCDIR=$VENV/share/doc/pairlb
STAMP=$VENV/.pairlb-install
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

# The hash of what would be installed: decides whether the venv needs pip at all.
source_digest() {
    if [ -n "$WHEELHOUSE" ]; then
        (cd "$WHEELHOUSE" && find . -maxdepth 1 -name '*.whl' -type f | LC_ALL=C sort | xargs -r sha256sum)
    else
        (cd "$SOURCE" && find pyproject.toml lb healthcheck failover lab -type f \
            \( -name '*.py' -o -name '*.toml' -o -name 'py.typed' \) -not -path '*/__pycache__/*' \
            | LC_ALL=C sort | xargs sha256sum)
    fi | sha256sum | cut -d' ' -f1
    echo "$PREFIX"
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
    fi
    local digest
    digest=$(source_digest)
    if [ -x "$VENV/bin/pairlb" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$digest" ]; then
        say "unchanged  ${VENV#$R} (same sources as the last install)"
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
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "$SOURCE"
    fi
    printf '%s\n' "$digest" >"$STAMP"
    say "installed  ${VENV#$R} ($("$VENV/bin/pairlb" version))"
    CHANGED=1
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
