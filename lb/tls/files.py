"""Certificate and key files, read and checked by the control process (root) before any worker
sees them: every problem is one message naming the file and the key of the config.

Checks, in the order an operator would fix them:

- the private key is a secret: a regular file owned by root or pairlb's user, not accessible
  by group or others; a symbolic link is followed only when it is owned by root or pairlb's
  user too (certbot's ``live/`` links are), so nobody else can point pairlb at another file;
- the certificate file holds a PEM certificate (the leaf first, then its chain);
- the key is not encrypted, and matches the certificate (OpenSSL's own check, in a
  throwaway context: a live context is never touched).

An expired or not-yet-valid certificate loads (refusing it would take the listener down on a
reload) and is reported: /status shows its not-after, /metrics its expiry and an alert fires.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import ssl
import stat
from dataclasses import dataclass

from lb.config import CertificateConfig, Config, ListenerConfig
from lb.tls import contexts, ticketkeys

MAX_PEM_BYTES = 1 << 20
"""A certificate chain or key file larger than this is refused (not a PEM someone meant)."""
MAX_LINK_HOPS = 8


class TlsFileError(ValueError):
    """A certificate or key that cannot be served; the message names the file."""


@dataclass(frozen=True)
class CertBundle:
    """One certificate as the control process loaded it, and as the workers get it."""

    cert_file: str
    key_file: str
    names: tuple[str, ...]
    """DNS names (wildcards included) the SNI lookup matches."""
    ips: tuple[str, ...]
    not_before: float
    not_after: float
    fingerprint: str
    """SHA-256 of the PEM chain (hex, first 16): tells a renewed certificate from the old."""
    pem: bytes
    """The chain, then the key: what ``contexts.load_pem`` takes."""

    @property
    def cert_id(self) -> str:
        """The ``cert`` label of metrics: the certificate file's path (unique per listener)."""
        return self.cert_file

    def to_wire(self) -> dict[str, object]:
        return {"cert_file": self.cert_file, "key_file": self.key_file,
                "names": list(self.names), "ips": list(self.ips),
                "not_before": self.not_before, "not_after": self.not_after,
                "fingerprint": self.fingerprint, "pem": self.pem.decode("ascii")}

    @classmethod
    def from_wire(cls, d: dict[str, object]) -> CertBundle:
        return cls(
            str(d["cert_file"]), str(d["key_file"]),
            tuple(str(n) for n in d["names"]),  # type: ignore[attr-defined]
            tuple(str(n) for n in d["ips"]),  # type: ignore[attr-defined]
            float(d["not_before"]), float(d["not_after"]),  # type: ignore[arg-type]
            str(d["fingerprint"]), str(d["pem"]).encode("ascii"),
        )


def _trusted_owner(uid: int) -> bool:
    return uid == 0 or uid == os.geteuid()


def _resolve(path: str, what: str = "file") -> str:
    """Follow symbolic links only while each is owned by root or us."""
    seen = 0
    while True:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise TlsFileError(f"{what} {path}: no such file") from None
        except OSError as exc:
            raise TlsFileError(f"{what} {path}: {exc.strerror}") from None
        if not stat.S_ISLNK(st.st_mode):
            return path
        if not _trusted_owner(st.st_uid):
            raise TlsFileError(f"{path}: a symbolic link owned by uid {st.st_uid} (refused: "
                               f"only root or pairlb's user may point at a key)")
        seen += 1
        if seen > MAX_LINK_HOPS:
            raise TlsFileError(f"{path}: too many symbolic links")
        target = os.readlink(path)
        path = os.path.join(os.path.dirname(path), target)


def read_secret_file(path: str, what: str = "key_file") -> bytes:
    """A secret file's bytes, after the checks in the module docstring."""
    real = _resolve(path, what)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TlsFileError(f"{what} {path}: cannot open: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise TlsFileError(f"{what} {path}: not a regular file")
    with os.fdopen(fd, "rb") as f:
        if not _trusted_owner(st.st_uid):
            raise TlsFileError(f"{what} {path}: owned by uid {st.st_uid}; a secret must "
                               f"belong to root or pairlb's user (chown root {real})")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise TlsFileError(f"{what} {path}: accessible by group or others (mode "
                               f"{mode:04o}); fix it with: chmod 600 {real}")
        data = f.read(MAX_PEM_BYTES + 1)
    if len(data) > MAX_PEM_BYTES:
        raise TlsFileError(f"{what} {path}: larger than {MAX_PEM_BYTES} bytes")
    return data


def read_key_file(path: str) -> bytes:
    """A private key file's bytes: a secret holding one unencrypted PEM private key."""
    data = read_secret_file(path)
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data:
        raise TlsFileError(f"key_file {path}: the private key is encrypted (a pass phrase is "
                           f"not supported: store it unencrypted, mode 0600)")
    if b"PRIVATE KEY-----" not in data:
        raise TlsFileError(f"key_file {path}: no PEM private key in it")
    return data


def read_cert_file(path: str) -> bytes:
    data = read_public_file(path, "cert_file")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TlsFileError(f"cert_file {path}: no PEM certificate in it")
    return data


def load_certificate(cc: CertificateConfig) -> CertBundle:
    """Read, check and describe one certificate; TlsFileError names what is wrong."""
    chain = read_cert_file(cc.cert_file)
    key = read_key_file(cc.key_file)
    try:
        decoded = contexts.decode_cert(chain)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TlsFileError(f"cert_file {cc.cert_file}: not a valid PEM certificate "
                           f"({exc})") from None
    pem = key if cc.cert_file == cc.key_file else chain.rstrip(b"\n") + b"\n" + key
    try:
        contexts.load_pem(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), pem)
    except contexts.EncryptedKey:
        raise TlsFileError(f"key_file {cc.key_file}: the private key is encrypted (a pass "
                           f"phrase is not supported)") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsFileError(f"key_file {cc.key_file} does not match cert_file "
                               f"{cc.cert_file} (a key from another certificate?)") from None
        raise TlsFileError(f"cert_file {cc.cert_file} / key_file {cc.key_file}: OpenSSL "
                           f"refused them: {exc.reason or exc}") from None
    names, ips = contexts.cert_names(decoded)
    try:
        not_before = contexts.cert_time(decoded["notBefore"])
        not_after = contexts.cert_time(decoded["notAfter"])
    except (KeyError, ValueError):
        raise TlsFileError(f"cert_file {cc.cert_file}: no validity dates") from None
    return CertBundle(cc.cert_file, cc.key_file, names, ips, not_before, not_after,
                      hashlib.sha256(chain).hexdigest()[:16], pem)


def read_ticket_key(path: str) -> bytes:
    """The 80-byte session ticket key in ``path`` (a secret, like a private key)."""
    raw = read_secret_file(path, "ticket_key_file")
    try:
        return ticketkeys.parse_key_file(raw, path)
    except ValueError as exc:
        raise TlsFileError(f"ticket_key_file {exc}") from None


def load_listener(lcfg: ListenerConfig) -> tuple[CertBundle, ...]:
    assert lcfg.tls is not None
    return tuple(load_certificate(cc) for cc in lcfg.tls.certificates)


def load_all(cfg: Config) -> tuple[dict[str, tuple[CertBundle, ...]], list[str]]:
    """Every TLS listener's certificates, and one error line per problem (dotted key first)."""
    out: dict[str, tuple[CertBundle, ...]] = {}
    errors: list[str] = []
    for i, lcfg in enumerate(cfg.listener):
        if lcfg.tls is None:
            continue
        bundles = []
        for j, cc in enumerate(lcfg.tls.certificates):
            try:
                bundles.append(load_certificate(cc))
            except TlsFileError as exc:
                errors.append(f"listener[{i}].tls.certificates[{j}]: {exc}")
        if lcfg.tls.ticket_key_file is not None:
            try:
                read_ticket_key(lcfg.tls.ticket_key_file)
            except (TlsFileError, ValueError) as exc:
                errors.append(f"listener[{i}].tls.ticket_key_file: {exc}")
        if len(bundles) == len(lcfg.tls.certificates):
            out[lcfg.name] = tuple(bundles)
    return out, errors


__all__ = [
    "CertBundle",
    "TlsFileError",
    "load_all",
    "load_certificate",
    "read_key_file",
    "read_public_file",
    "read_secret_file",
    "read_ticket_key",
    "stage",
]


def stage(src: str, dst: str) -> list[str]:
    """Copy the files of ``src`` (certificates and keys, root's) into ``dst``, owned by
    ``dst``'s owner, mode 0600: what the systemd unit runs as root (``ExecStartPre=+``,
    ``ExecReload=+``) so that the service's dynamic user can read the keys at every reload.
    Each file is replaced atomically (written beside, then renamed); files no longer in
    ``src`` are removed. Links in ``src`` are followed by the key rules (owned by root or
    us). A missing ``src`` is an empty one. Returns the names copied.

    ``dst`` belongs to the service's user, who may have put anything there: it is opened
    with O_NOFOLLOW (a symlink in its place is refused) and every write, rename and unlink
    goes through that descriptor, never through a path."""
    try:
        dfd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise TlsFileError(f"{dst}: not a directory (a symbolic link is refused): "
                           f"{exc.strerror}") from None
    try:
        st = os.fstat(dfd)
        names = sorted(os.listdir(src)) if os.path.isdir(src) else []
        staged: list[tuple[str, str]] = []  # (temporary name, name): renamed when all are in
        try:
            for name in names:
                if name.startswith("."):
                    continue
                path = os.path.join(src, name)
                real = _resolve(path)
                if not os.path.isfile(real):
                    continue  # subdirectories (certbot's archive/, live/) are not staged
                data = read_public_file(path, "file")
                if b"PRIVATE KEY" in data or b"-----BEGIN CERTIFICATE-----" not in data:
                    # Public only when it holds certificates and no key: anything else (a
                    # key, a ticket key) must pass the secret checks at its source.
                    data = read_secret_file(path, "file")
                tmp = f".{name}.{secrets.token_hex(6)}.tmp"  # nothing the user can foresee
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600, dir_fd=dfd)
                staged.append((tmp, name))
                try:
                    os.fchown(fd, st.st_uid, st.st_gid)
                    os.fchmod(fd, 0o600)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
            copied = []
            for tmp, name in staged:
                try:
                    os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                except IsADirectoryError:
                    try:  # a directory in the way: only an empty one goes
                        os.rmdir(name, dir_fd=dfd)
                    except OSError:
                        raise TlsFileError(f"{dst}/{name}: a directory is in the way of "
                                           f"{src}/{name}; remove it") from None
                    os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                copied.append(name)
        except BaseException:
            for tmp, _ in staged:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
            raise
        for name in os.listdir(dfd):
            if name not in copied:
                with contextlib.suppress(OSError):  # a directory planted there stays
                    os.unlink(name, dir_fd=dfd)
        return copied
    finally:
        os.close(dfd)


def read_public_file(path: str, what: str, limit: int = MAX_PEM_BYTES) -> bytes:
    """A file that is not secret (a certificate chain, a CA bundle): a regular file (a FIFO
    or a device would block or never end) of at most ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TlsFileError(f"{what} {path}: no such file") from None
    except OSError as exc:
        raise TlsFileError(f"{what} {path}: cannot read: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TlsFileError(f"{what} {path}: not a regular file")
        chunks, n = [], 0
        while n <= limit:
            chunk = os.read(fd, limit + 1 - n)
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
    finally:
        os.close(fd)
    if n > limit:
        raise TlsFileError(f"{what} {path}: larger than {limit} bytes")
    return b"".join(chunks)
