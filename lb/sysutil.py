"""Process privileges and OOM priority: what each pairlb process may do, set by itself.

The proxy workers parse untrusted bytes, so they give up everything right after start,
before any client byte: ``drop_privileges()`` sets ``no_new_privs``, clears the ambient,
bounding (when it may), permitted, effective and inheritable capability sets, and, when it
runs as root, switches to an unprivileged user with no supplementary groups. It then reads
``/proc/self/status`` back and raises ``PrivilegeError`` unless the drop really happened;
the caller must not serve then. The listening sockets are inherited, so a worker needs no
privilege at all.

``set_oom_score_adj()`` ranks processes for the kernel's OOM killer. The control process,
which sends the heartbeats, keeps a low score (``OOM_SCORE_ADJ_CONTROL``: the unit's
``OOMScoreAdjust=``, or written at start when it may lower its own); each worker sits
``OOM_SCORE_ADJ_GAP`` (1000) points above it (``worker_oom_score_adj``: +500 under the unit,
+1000 where the control process stays at 0). A gap of 1000 points outweighs any difference
in size (the OOM badness is RSS + adj/1000 x the memory available), so a worker is always
chosen before the control process, however large the control process grew. Any other
process pairlb starts (the failover process, say) inherits the control process's score;
it may call ``lower_oom_score_adj(OOM_SCORE_ADJ_CONTROL)``, and
``drop_privileges(target, keep=...)`` to keep only the capabilities it needs.

Linux only; stdlib only (ctypes for prctl(2) and capset(2)). Imports nothing from lb.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import grp
import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass

OOM_SCORE_ADJ_CONTROL = -500
"""The control process (heartbeats, VIP, supervision) is the last choice."""
OOM_SCORE_ADJ_GAP = 1000
"""Workers sit this far above the control process: first choice of the OOM killer (their
slot is refilled in milliseconds), whatever the sizes."""
EXIT_PRIVILEGES = 78
"""A worker's exit status when it could not drop its privileges (EX_CONFIG): it never served."""
DEFAULT_UNPRIVILEGED_USER = "nobody"
"""The workers' user when pairlb runs as root and node.worker_user is not set."""

# prctl(2) options and capset(2) constants from <linux/prctl.h> and <linux/capability.h>.
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_SETPCAP = 8


class PrivilegeError(Exception):
    """Privileges could not be dropped (or a target identity is unusable); says what to fix."""


@dataclass(frozen=True)
class Identity:
    """Whom a worker runs as: numeric ids, the names for messages; ``switch``: change to it."""

    uid: int
    gid: int
    user: str
    group: str
    switch: bool
    """True when the process must change user (it runs as root); False: it keeps its own."""

    def args(self) -> list[str]:
        """The worker's command-line arguments that carry this identity."""
        return ["--uid", str(self.uid), "--gid", str(self.gid)]


@dataclass(frozen=True)
class ProcStatus:
    """The privilege lines of /proc/PID/status."""

    uids: tuple[int, ...]
    """real, effective, saved, filesystem"""
    gids: tuple[int, ...]
    groups: tuple[int, ...]
    cap_inh: int
    cap_prm: int
    cap_eff: int
    cap_bnd: int
    cap_amb: int
    no_new_privs: bool

    def summary(self) -> str:
        return (
            f"uid={self.uids[1]} gid={self.gids[1]} groups={len(self.groups)} "
            f"cap_eff={self.cap_eff:x} cap_prm={self.cap_prm:x} cap_inh={self.cap_inh:x} "
            f"cap_amb={self.cap_amb:x} cap_bnd={self.cap_bnd:x} "
            f"no_new_privs={int(self.no_new_privs)}"
        )


def read_proc_status(pid: int | str = "self") -> ProcStatus:
    """Parse the privilege lines of /proc/PID/status (a kernel without ambient caps: 0)."""
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()

    def ids(key: str) -> tuple[int, ...]:
        return tuple(int(x) for x in fields.get(key, "").split())

    def caps(key: str) -> int:
        return int(fields.get(key, "0"), 16)

    return ProcStatus(
        uids=ids("Uid"),
        gids=ids("Gid"),
        groups=ids("Groups"),
        cap_inh=caps("CapInh"),
        cap_prm=caps("CapPrm"),
        cap_eff=caps("CapEff"),
        cap_bnd=caps("CapBnd"),
        cap_amb=caps("CapAmb"),
        no_new_privs=fields.get("NoNewPrivs", "0") == "1",
    )


# -- who the workers run as ------------------------------------------------------------------


def _lookup_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(f"node.worker_user: no such user {name!r} on this host") from None


def _lookup_group(name: str) -> grp.struct_group:
    try:
        return grp.getgrgid(int(name)) if name.isdigit() else grp.getgrnam(name)
    except KeyError:
        raise PrivilegeError(f"node.worker_group: no such group {name!r} on this host") from None


def worker_identity(user: str | None, group: str | None) -> Identity:
    """Whom the workers run as, given ``node.worker_user``/``worker_group`` and who we are.

    As root: ``user`` (default ``nobody``) and ``group`` (default: that user's primary group,
    ``nogroup`` for ``nobody``); neither may be root. Not root (the systemd unit's dynamic
    user): our own user and group; naming another one is an error, since switching needs
    root. Raises PrivilegeError naming the setting to fix.
    """
    euid, egid = os.geteuid(), os.getegid()
    if euid != 0:
        me = _name_of_uid(euid)
        if user is not None and _lookup_user(user).pw_uid != euid:
            raise PrivilegeError(
                f"node.worker_user: {user!r} differs from the user pairlb runs as ({me}, uid "
                f"{euid}), and only root can switch users; leave it unset to run the workers "
                f"as {me} (under the systemd unit: the service's dynamic user)"
            )
        if group is not None and _lookup_group(group).gr_gid != egid:
            raise PrivilegeError(
                f"node.worker_group: {group!r} differs from the group pairlb runs as (gid "
                f"{egid}), and only root can switch groups; leave it unset"
            )
        return Identity(euid, egid, me, _name_of_gid(egid), switch=False)
    pw = _lookup_user(user or DEFAULT_UNPRIVILEGED_USER)
    if pw.pw_uid == 0:
        raise PrivilegeError(
            f"node.worker_user: {pw.pw_name!r} is root (uid 0); the workers parse untrusted "
            f"bytes and must run as an unprivileged user, e.g. nobody"
        )
    gid = _lookup_group(group).gr_gid if group is not None else pw.pw_gid
    if gid == 0:
        raise PrivilegeError(
            "node.worker_group: the workers must not run with group 0 (root); "
            "name an unprivileged group, e.g. nogroup"
        )
    return Identity(pw.pw_uid, gid, pw.pw_name, _name_of_gid(gid), switch=True)


def _name_of_uid(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _name_of_gid(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# -- prctl and capset ------------------------------------------------------------------------


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                                ctypes.c_ulong]
        _libc.prctl.restype = ctypes.c_int
        _libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
        _libc.capset.restype = ctypes.c_int
    return _libc


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    """prctl(2); raises OSError with the errno."""
    if _c().prctl(option, arg2, arg3, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """capset(2) on this thread, 64-bit masks; raises OSError (EPERM under a syscall filter
    without capset, or when asked to raise a capability)."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    if _c().capset(ctypes.byref(hdr), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def _cap_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def _mask(caps: Iterable[int]) -> int:
    out = 0
    for c in caps:
        out |= 1 << c
    return out


def drop_privileges(
    target: Identity | None, keep: Iterable[int] = (), *, keep_ambient: bool = False
) -> ProcStatus:
    """Give up every privilege but the capabilities in ``keep``, then verify.

    In order: no_new_privs; ambient set cleared; bounding set reduced to ``keep`` (only
    possible with CAP_SETPCAP, i.e. as root; under the unit the bounding set is already the
    unit's three and no_new_privs makes it unreachable); then, when ``target.switch``,
    supplementary groups cleared and gid and uid set (real, effective and saved); finally
    permitted and effective set to ``keep``, inheritable to nothing. With ``keep_ambient``
    the ``keep`` set is also made inheritable and ambient, so programs this process runs
    (nft) get exactly those. Returns the resulting /proc/self/status; raises
    PrivilegeError if anything did not take (never serve then).

    Workers call ``drop_privileges(identity)``. A process that needs some capabilities,
    such as the failover process (CAP_NET_ADMIN, CAP_NET_RAW for the VIP, ARP and its nft
    commands), calls ``drop_privileges(identity_or_None, {CAP_NET_ADMIN, CAP_NET_RAW},
    keep_ambient=True)``.
    """
    keep_mask = _mask(keep)
    inheritable = keep_mask if keep_ambient else 0
    try:
        prctl(PR_SET_NO_NEW_PRIVS, 1)
    except OSError as exc:
        raise PrivilegeError(f"cannot set no_new_privs: {exc.strerror}") from None
    try:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: a kernel without ambient capabilities
            raise PrivilegeError(f"cannot clear the ambient capabilities: {exc.strerror}") from None
    before = read_proc_status()
    if before.cap_eff & (1 << CAP_SETPCAP):
        for cap in range(_cap_last_cap() + 1):
            if not keep_mask & (1 << cap):
                try:
                    prctl(PR_CAPBSET_DROP, cap)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise PrivilegeError(
                            f"cannot drop capability {cap} from the bounding set: {exc.strerror}"
                        ) from None
    if target is not None and target.switch:
        try:
            prctl(PR_SET_KEEPCAPS, 1 if keep_mask else 0)
            os.setgroups([])
            os.setresgid(target.gid, target.gid, target.gid)
            os.setresuid(target.uid, target.uid, target.uid)
            prctl(PR_SET_KEEPCAPS, 0)
        except OSError as exc:
            raise PrivilegeError(
                f"cannot switch to user {target.user} (uid {target.uid}) and group "
                f"{target.group} (gid {target.gid}): {exc.strerror}"
            ) from None
    else:
        with contextlib.suppress(OSError):  # nothing to keep: no uid change happens
            prctl(PR_SET_KEEPCAPS, 0)
    try:
        capset(keep_mask, keep_mask, inheritable)
    except OSError as exc:
        raise PrivilegeError(
            f"cannot empty the capability sets: {exc.strerror} (a SystemCallFilter= that "
            f"denies capset? the shipped unit allows it)"
        ) from None
    for cap in range(_cap_last_cap() + 1) if inheritable else ():
        if inheritable & (1 << cap):
            try:
                prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)
            except OSError as exc:
                raise PrivilegeError(
                    f"cannot keep capability {cap} for programs run: {exc.strerror}"
                ) from None
    return verify_dropped(target, keep_mask, bounding=bool(before.cap_eff & (1 << CAP_SETPCAP)),
                          ambient=inheritable)


def verify_dropped(target: Identity | None, keep_mask: int = 0, bounding: bool = False,
                   ambient: int = 0) -> ProcStatus:
    """Read /proc/self/status; raise PrivilegeError unless the drop took everywhere (only
    ``keep_mask`` left in permitted and effective, only ``ambient`` in inheritable and
    ambient)."""
    st = read_proc_status()
    problems = []
    for name, value in (("CapEff", st.cap_eff), ("CapPrm", st.cap_prm)):
        if value & ~keep_mask:
            problems.append(f"{name}={value:016x}")
    if st.cap_inh & ~ambient:
        problems.append(f"CapInh={st.cap_inh:016x}")
    if st.cap_amb & ~ambient:
        problems.append(f"CapAmb={st.cap_amb:016x}")
    if bounding and st.cap_bnd & ~keep_mask:
        problems.append(f"CapBnd={st.cap_bnd:016x}")
    if not st.no_new_privs:
        problems.append("NoNewPrivs=0")
    if target is not None:
        if set(st.uids) != {target.uid}:
            problems.append(f"Uid={st.uids} (want {target.uid})")
        if set(st.gids) != {target.gid}:
            problems.append(f"Gid={st.gids} (want {target.gid})")
        if target.switch and st.groups:
            problems.append(f"Groups={st.groups}")
    if 0 in st.uids and target is not None and target.switch:
        problems.append("still uid 0")
    if problems:
        raise PrivilegeError("privileges still held after the drop: " + ", ".join(problems))
    return st


# -- OOM killer ranking ----------------------------------------------------------------------


def get_oom_score_adj(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/oom_score_adj", encoding="ascii") as f:
        return int(f.read())


def set_oom_score_adj(value: int, pid: int | str = "self") -> None:
    """Write /proc/PID/oom_score_adj (-1000..1000). Raising it needs no privilege (for a
    process of one's own user); lowering it below what a privileged process set needs
    CAP_SYS_RESOURCE (OSError otherwise). Write it before a uid change: after one,
    /proc/self belongs to root."""
    if not -1000 <= value <= 1000:
        raise ValueError(f"oom_score_adj must be in -1000..1000 (got {value})")
    with open(f"/proc/{pid}/oom_score_adj", "w", encoding="ascii") as f:
        f.write(str(value))


def worker_oom_score_adj(control_adj: int) -> int:
    """A worker's score given its control process's: OOM_SCORE_ADJ_GAP above, at most 1000."""
    return max(-1000, min(1000, control_adj + OOM_SCORE_ADJ_GAP))


def lower_oom_score_adj(value: int) -> int:
    """Make this process's score at most ``value`` if allowed; returns the score in force
    (a lower one set by systemd's OOMScoreAdjust= or an operator is kept)."""
    current = get_oom_score_adj()
    if current > value:
        try:
            set_oom_score_adj(value)
        except OSError:
            return current
        return get_oom_score_adj()
    return current


def raise_nofile_limit() -> tuple[int, int]:
    """The soft RLIMIT_NOFILE raised to the hard one (what Go's runtime and HAProxy do):
    every worker holds every slot's listening socket, and a proxy holds two descriptors a
    connection, so the usual soft 1,024 outside the unit (LimitNOFILE) runs out first.
    Returns (before, now); the workers inherit it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft, soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return soft, want
    return soft, soft


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MALLOC_MMAP_THRESHOLD = 128 << 10
"""glibc's starting value, kept: a block this large (a 256,000-byte read of uvloop's, a
joined body) is mapped on its own and given back when freed, never left in the heap."""
MALLOC_TRIM_THRESHOLD = 4 << 20
"""Free heap kept at its top for reuse before any is given back: a turn's worth of large
responses (about sixty of 64 KiB)."""


def tune_malloc() -> bool:
    """glibc's heap for a proxy worker: keep a turn's freed responses for the next turn.

    A worker holds the large responses of one turn of its loop at once and frees them
    together; with glibc's defaults (trim once 128 KiB of the heap's top is free) that memory
    goes back to the kernel after every turn and comes back as page faults in the next (~4
    for a 64 KiB response). Setting a threshold also stops glibc from moving the mmap one by
    itself, so it is set to the value glibc starts with. False where there is no mallopt
    (not glibc) or it refused a value."""
    try:
        mallopt = _c().mallopt
    except AttributeError:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
                and mallopt(M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))
