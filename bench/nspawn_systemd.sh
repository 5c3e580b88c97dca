#!/usr/bin/env bash
# Run the real pairlb.service under a real systemd (252, Debian bookworm) booted with
# systemd-nspawn, and check what the unit promises: start + READY + STATUS, the sandbox
# (dynamic user, three capabilities, no new privileges, seccomp; workers with none; OOM
# ranking and memory limits), credentials, reload
# (valid and broken), stop with a request in flight, journald priorities, a watchdog restart
# when the control loop hangs, and failover taking and releasing a VIP (with the connection
# handover's nft table installed from inside the sandbox and removed at stop).
#
#   sudo bench/nspawn_systemd.sh [--tree DIR] [--keep]
#
#   --tree DIR  copy an existing debootstrapped bookworm tree instead of running debootstrap
#   --keep      leave the work directory (/var/tmp/plb-nspawn-XXXX) behind for inspection
#
# Needs: root, `apt-get install systemd-container debootstrap`, the Debian mirror (for
# debootstrap) and PyPI (wheels are built on the host, so the container needs no network).
# Works on a host whose PID 1 is not systemd: nspawn runs with --register=no --keep-unit and
# commands enter the container with nsenter. The container has a private network namespace
# (only lo, plus a veth pair created inside it), so the host's network is never touched.
# Takes ~3 minutes, most of it debootstrap. Prints PASS/FAIL lines with measured times and
# exits non-zero if any check failed.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
TREE_SRC=
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --tree) TREE_SRC=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 2; }
for tool in systemd-nspawn nsenter; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install systemd-container)" >&2; exit 2; }
done

WORK=$(mktemp -d /var/tmp/plb-nspawn-XXXX)
TREE=$WORK/tree
NSPAWN_PID=
FAILS=0

cleanup() {
    if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        kill -TERM "$NSPAWN_PID"     # nspawn asks the container's systemd to power off
        for _ in $(seq 1 40); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.25; done
        kill -KILL "$NSPAWN_PID" 2>/dev/null || true
    fi
    if [ "$KEEP" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }
pass() { echo "PASS  $*"; }
fail() { echo "FAIL  $*"; FAILS=$((FAILS + 1)); }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }

# Run a command inside the container (all its namespaces) with a clean environment.
C() {
    nsenter -t "$CPID" -m -u -i -n -p -- /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root TERM=dumb SYSTEMD_COLORS=0 SYSTEMD_PAGER= "$@"
}
# ... but in the host's network namespace (to reach nothing; used for the install only).
C_HOSTNET() {
    nsenter -t "$CPID" -m -u -i -p -- /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root "$@"
}
prop() { C systemctl show -p "$1" --value pairlb.service; }
# grep without -q: with pipefail, an early exit would SIGPIPE journalctl and fail the check.
journal_has() { C journalctl -u pairlb "${@:2}" -o cat | grep -- "$1" >/dev/null; }

echo "== tree ($WORK)"
t0=$(now)
if [ -n "$TREE_SRC" ]; then
    cp -a "$TREE_SRC" "$TREE"
else
    debootstrap --variant=minbase \
        --include=systemd,systemd-sysv,dbus,python3,python3-venv,procps,iproute2,nftables,curl,ca-certificates \
        bookworm "$TREE" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1
fi
echo "      tree ready in $(since "$t0") s"

echo "== source and wheels (built on the host: the container has no network)"
mkdir -p "$TREE/root/src"
for d in lb healthcheck failover deploy docs; do
    [ -e "$REPO/$d" ] && cp -r "$REPO/$d" "$TREE/root/src/"
done
cp "$REPO/pyproject.toml" "$REPO/README.md" "$TREE/root/src/"
find "$TREE/root/src" -name __pycache__ -prune -exec rm -rf {} +
"$PY" -m pip wheel -q --wheel-dir "$TREE/root/wheels" "$TREE/root/src" 2>&1 | grep -v -i "ignored" || true

echo "== boot"
t0=$(now)
setsid systemd-nspawn -q --register=no --keep-unit --private-network -D "$TREE" -b \
    >"$WORK/boot.log" 2>&1 </dev/null &
NSPAWN_PID=$!
CPID=
for _ in $(seq 1 100); do
    CPID=$(pgrep -P "$NSPAWN_PID" || true)
    if [ -n "$CPID" ]; then
        state=$(C systemctl is-system-running 2>/dev/null || true)
        case "$state" in running|degraded) break ;; esac
    fi
    sleep 0.2
done
check "container booted: systemd $(C systemctl --version | head -1 | cut -d' ' -f2), state '$state' in $(since "$t0") s" \
    test "$state" = running -o "$state" = degraded
C ip link set lo up

echo "== install"
C_HOSTNET /bin/bash /root/src/deploy/install.sh --python /usr/bin/python3 \
    --wheelhouse /root/wheels >"$WORK/install.log" 2>&1
check "install.sh --wheelhouse: $(grep -c -E 'installed|created' "$WORK/install.log") items" true
C_HOSTNET /bin/bash /root/src/deploy/install.sh --python /usr/bin/python3 \
    --wheelhouse /root/wheels >"$WORK/install2.log" 2>&1
check "install.sh second run: nothing to do" grep -q "Nothing to do" "$WORK/install2.log"
exposure=$(C systemd-analyze security pairlb.service 2>/dev/null | sed -n 's/.*Overall exposure level for pairlb.service: \([0-9.]*\).*/\1/p')
check "systemd-analyze security (online, real manager): exposure $exposure" \
    awk -v e="$exposure" 'BEGIN{exit !(e != "" && e <= 2.0)}'

conf=$TREE/etc/pairlb/pairlb.toml
sed -i 's/10.0.0.11:8080/127.0.0.1:9001/; s/10.0.0.12:8080/127.0.0.1:9002/' "$conf"
for b in 1 2; do
    C systemd-run -q --unit "plb-backend$b" /opt/pairlb/bin/python -m lab.backend_app "b$b" "127.0.0.1:900$b"
done
sleep 1

echo "== start"
t0=$(now)
C systemctl start pairlb
check "systemctl start returned after READY=1 in $(since "$t0") s (ExecStartPre included)" \
    test "$(prop ActiveState)/$(prop SubState)" = active/running
status=$(prop StatusText)
check "STATUS= '$status'" grep -q "role=STANDALONE backends_up=./2 workers=" <<<"$status"
code=$(C curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1/)
check "port 80 served by the dynamic user (CAP_NET_BIND_SERVICE): HTTP $code" test "$code" = 200
main=$(prop MainPID)
uid=$(C awk '/^Uid:/{print $2}' "/proc/$main/status")
caps=$(C awk '/^CapEff:/{print $2}' "/proc/$main/status")
nnp=$(C awk '/^NoNewPrivs:/{print $2}' "/proc/$main/status")
seccomp=$(C awk '/^Seccomp:/{print $2}' "/proc/$main/status")
check "runs as uid $uid (dynamic), CapEff $caps (= NET_BIND_SERVICE|NET_ADMIN|NET_RAW), NoNewPrivs $nnp, Seccomp $seccomp" \
    test "$uid" -ge 61184 -a "$caps" = 0000000000003400 -a "$nnp" = 1 -a "$seccomp" = 2
nices=$(C ps -o ni= --ppid "$main" | tr -s ' \n' ' ')
check "workers reniced themselves (setpriority allowed): nice$nices" grep -q 5 <<<"$nices"
workers=$(C pgrep -P "$main" -f 'lb[.]data[.]worker' | tr '\n' ' ')
wbad=0
for w in $workers; do
    wst=$(C awk '/^(Uid|CapInh|CapPrm|CapEff|CapAmb|NoNewPrivs):/{printf "%s%s ", $1, $2}' "/proc/$w/status")
    [ "$wst" = "Uid:$uid CapInh:0000000000000000 CapPrm:0000000000000000 CapEff:0000000000000000 CapAmb:0000000000000000 NoNewPrivs:1 " ] \
        || { echo "      worker $w: $wst"; wbad=1; }
done
check "workers ($workers) dropped every capability (capset allowed), same dynamic user, NoNewPrivs" \
    test -n "$workers" -a "$wbad" = 0
adj_main=$(C cat "/proc/$main/oom_score_adj")
adj_workers=$(for w in $workers; do C cat "/proc/$w/oom_score_adj"; done | sort -u | tr '\n' ' ')
# systemd applies OOMScoreAdjust=-500 only with CAP_SYS_RESOURCE; a container (this one on
# a VM without it) leaves the control process at 0, and the workers then go to +1000.
pid1_caps=$(C awk '/^CapEff:/{print $2}' /proc/1/status)
want_main=-500; [ $(( 0x$pid1_caps >> 24 & 1 )) = 1 ] || want_main=0
want_workers=$(( want_main + 1000 > 1000 ? 1000 : want_main + 1000 ))
check "OOM ranking: control process $adj_main (OOMScoreAdjust=; $want_main expected here), workers $adj_workers(1000 above)" \
    test "$adj_main" = "$want_main" -a "$adj_workers" = "$want_workers "
check "memory limits: MemoryHigh=$(prop MemoryHigh) MemoryMax=$(prop MemoryMax) OOMPolicy=$(prop OOMPolicy)" \
    test "$(prop MemoryMax)" != infinity -a "$(prop OOMPolicy)" = continue
cred=$(C stat -c '%a %u' /run/credentials/pairlb.service/admin.token)
check "credential copy of the token: mode/owner '$cred' (the service's uid)" \
    test "$cred" = "400 $uid"
code=$(C sh -c 'curl -s -o /dev/null -w "%{http_code}" -X POST -H "Authorization: Bearer $(cat /etc/pairlb/admin.token)" http://127.0.0.1:9900/backends/web/web1/enable')
check "admin action with the token from the credential: HTTP $code" test "$code" = 200
fds=$(C curl -s http://127.0.0.1:9900/metrics | grep -c '^pairlb_process_open_fds' || true)
check "process metrics present in the sandbox (needs /proc/stat, so no ProcSubset=pid): $fds" \
    test "$fds" -ge 1
start_backends() {
    for b in 1 2; do
        C systemd-run -q --unit "plb-backend$b" /opt/pairlb/bin/python -m lab.backend_app "b$b" "127.0.0.1:900$b"
    done
}
C systemctl stop plb-backend1 plb-backend2
t0=$(now)
for _ in $(seq 1 50); do journal_has event=pool_panic -p err && break; sleep 0.2; done
check "journald priorities: all backends down is an ERROR ('journalctl -p err') after $(since "$t0") s" \
    journal_has event=pool_panic -p err
start_backends
sleep 2

echo "== a missing key file"
C systemctl stop pairlb
mv "$TREE/etc/pairlb/failover.key" "$WORK/failover.key"
C systemctl start pairlb 2>/dev/null && rc=0 || rc=$?
why=$(C journalctl -u pairlb -n 5 -o cat | grep -o 'status=[0-9]*/[A-Z_]*' | tail -1 || true)
check "start without /etc/pairlb/failover.key fails: rc $rc, $why, result $(prop Result)" \
    test "$rc" != 0 -a "$(prop Result)" != success
mv "$WORK/failover.key" "$TREE/etc/pairlb/failover.key"
C systemctl reset-failed pairlb
C systemctl start pairlb
main=$(prop MainPID)

echo "== reload"
cp "$conf" "$WORK/good.toml"
sed -i '0,/^#retries = 2/s//retries = 1/' "$conf"
t0=$(now)
C systemctl reload pairlb && rc=0 || rc=$?
gen=$(C curl -s http://127.0.0.1:9900/status | grep -o '"generation": [0-9]*' | head -1)
check "valid reload: rc $rc in $(since "$t0") s, same MainPID, $gen" \
    test "$rc" = 0 -a "$(prop MainPID)" = "$main"
sed -i 's/^retries = 1/retry = 1/' "$conf"
C systemctl reload pairlb 2>/dev/null && rc=0 || rc=$?
code=$(C curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1/)
check "broken reload refused by ExecReload check-config: rc $rc, still $(prop ActiveState), HTTP $code" \
    test "$rc" != 0 -a "$(prop ActiveState)" = active -a "$code" = 200
cp "$WORK/good.toml" "$conf"

echo "== stop with a request in flight"
C sh -c 'curl -s -o /dev/null -w "%{http_code}" http://127.0.0.1/sleep/2 >/tmp/inflight & sleep 0.3'
t0=$(now)
C systemctl stop pairlb
sleep 0.2
inflight=$(C cat /tmp/inflight)
check "stop drained: in-flight request got HTTP $inflight, stop took $(since "$t0") s, result $(prop Result)" \
    test "$inflight" = 200 -a "$(prop Result)" = success

echo "== watchdog: hang the control loop (test-only sitecustomize: SIGURG sleeps 60 s)"
mkdir -p "$TREE/etc/pairlb-testhook" "$TREE/etc/systemd/system/pairlb.service.d"
cat >"$TREE/etc/pairlb-testhook/sitecustomize.py" <<'EOF'
import signal, time
signal.signal(signal.SIGURG, lambda signum, frame: time.sleep(60))
EOF
printf '[Service]\nEnvironment=PYTHONPATH=/etc/pairlb-testhook\n' \
    >"$TREE/etc/systemd/system/pairlb.service.d/testhook.conf"
C systemctl daemon-reload
C systemctl start pairlb
main=$(prop MainPID)
wd=$(prop WatchdogUSec)
restarts0=$(prop NRestarts)
t0=$(now)
C kill -URG "$main"
for _ in $(seq 1 150); do
    [ "$(prop NRestarts)" != "$restarts0" ] && [ "$(prop SubState)" = running ] && break
    sleep 0.2
done
newmain=$(prop MainPID)
check "hung loop -> watchdog ($wd) -> SIGABRT -> restart -> READY: new MainPID $newmain after $(since "$t0") s" \
    test "$newmain" != "$main" -a "$newmain" != 0 -a "$(prop SubState)" = running
check "journal says why: 'Watchdog timeout'" journal_has "Watchdog timeout"
rm -f "$TREE/etc/systemd/system/pairlb.service.d/testhook.conf"
C systemctl daemon-reload
C systemctl stop pairlb

echo "== failover: a veth pair inside the container's own network namespace"
IF=plb$(od -An -N2 -tx1 /dev/urandom | tr -d ' \n')
C ip link add "$IF" type veth peer name "${IF}p"
C ip addr add 192.0.2.1/24 dev "$IF"
C ip link set "$IF" up
C ip link set "${IF}p" up
"$PY" - "$conf" "$IF" <<'EOF'
import re, sys
path, ifname = sys.argv[1:]
text = open(path).read().replace("#[failover]\n", "[failover]\n")
for key, value in [("interface", f'"{ifname}"'), ("vips", '["192.0.2.10/24"]'),
                   ("peers", '["192.0.2.2"]'),
                   ("key_file", '"/run/credentials/pairlb.service/failover.key"')]:
    text = re.sub(rf"(?m)^#{key} = .*$", f"{key} = {value}", text, count=1)
open(path, "w").write(text)
EOF
t0=$(now)
C systemctl start pairlb
for _ in $(seq 1 50); do grep -q MASTER <<<"$(prop StatusText)" && break; sleep 0.1; done
has_vip=$(C ip -br addr show "$IF" | grep -c 192.0.2.10 || true)
check "alone on the link: '$(prop StatusText)', VIP on $IF: $has_vip, $(since "$t0") s after start" \
    test "$has_vip" = 1
check "connection handover installed inside the sandbox (nft + ip rule as the dynamic user)" \
    journal_has "handover_ready"
nft_tables=$(C nft list tables 2>&1 || true)
check "its nft table exists: $(tr '\n' ' ' <<<"$nft_tables")" grep -q pairlb <<<"$nft_tables"
C systemctl stop pairlb
nft_tables=$(C nft list tables 2>&1 || true)
check "stop removes the nft table: '$(tr '\n' ' ' <<<"$nft_tables")'" \
    test -z "$(grep pairlb <<<"$nft_tables" || true)"
has_vip=$(C ip -br addr show "$IF" | grep -c 192.0.2.10 || true)
check "stop releases the VIP: on $IF: $has_vip" test "$has_vip" = 0

echo
if [ "$FAILS" = 0 ]; then echo "all checks passed"; else echo "$FAILS check(s) failed"; fi
exit $((FAILS > 0))
