"""The ``pairlb`` command line: run, check-config, version, keygen, demo.

Subcommands import what they need lazily so ``pairlb version`` and ``check-config`` stay
fast and work even where optional parts (uvloop, pyroute2 privileges) are missing.
"""

from __future__ import annotations

import argparse
import sys

from lb import __version__
from lb import config as config_mod


def _load_or_report(path: str | None) -> config_mod.Config | None:
    try:
        if path is None:
            return config_mod.loads(config_mod.DEFAULT_CONFIG_TOML, "<embedded default>")
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        _report(exc.source or "config", exc.errors)
        return None


def _report(where: str, errors: list[str]) -> None:
    from lb.log import stderr_is_journal

    # Under systemd (ExecStartPre/ExecReload) these lines are errors in the journal too.
    prio = "<3>" if stderr_is_journal() else ""
    print(f"{prio}{where}: {len(errors)} error(s)", file=sys.stderr)
    for err in errors:
        print(f"{prio}  {err}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from lb import log
    from lb.control import daemon

    cfg = _load_or_report(args.config)
    if cfg is None:
        return 2
    if args.workers is not None:
        cfg = cfg.model_copy(update={"node": cfg.node.model_copy(update={"workers": args.workers})})
    log.setup(args.log_level or cfg.logging.level, cfg.logging.journald_prefix, "control")
    return daemon.run(cfg, args.config)


def cmd_check_config(args: argparse.Namespace) -> int:
    from lb.control import preflight

    cfg = _load_or_report(args.file)
    if cfg is None:
        return 2
    # What `run` checks against this host before it starts (files, users, interfaces, the
    # health checks as built): OK means it will start.
    errors, notes = preflight.check(cfg)
    if errors:
        _report(args.file, errors)
        return 2
    for note in notes if not args.quiet else []:
        print(f"{args.file}: note: {note}")
    if not args.quiet:
        print(
            f"{args.file}: OK (node {cfg.node.name}, {len(cfg.listener)} listener(s), "
            f"{len(cfg.pool)} pool(s), {sum(len(p.backends) for p in cfg.pool)} backend(s), "
            f"digest {cfg.digest()})"
        )
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"pairlb {__version__} (python {sys.version.split()[0]})")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    import failover

    if args.tls_ticket:
        import os

        from lb.tls.ticketkeys import KEY_LEN

        try:
            failover.write_secret(args.file, os.urandom(KEY_LEN).hex().encode() + b"\n",
                                  replace=args.force)
        except failover.SecretFileError as exc:
            hint = "; use --force to replace it" if exc.reason == "exists" else ""
            print(f"pairlb keygen: {args.file}: {exc.detail}{hint}", file=sys.stderr)
            return 1
        print(f"wrote a new TLS session ticket key to {args.file} (mode 0600); copy it to "
              f"every node and reload them (listener.tls.ticket_key_file)")
        return 0

    try:
        key = failover.write_key_file(args.file, force=args.force)
    except failover.FailoverError as exc:
        print(f"pairlb keygen: {exc}", file=sys.stderr)
        return 1
    print(f"wrote a new failover key to {args.file} (mode 0600, key id "
          f"{failover.key_id(key)}); copy it to every node")
    return 0


def cmd_stage_tls(args: argparse.Namespace) -> int:
    """Root's copy of the TLS files for a service that cannot read them (see lb.tls.files.stage)."""
    import os

    from lb.tls.files import TlsFileError, stage

    if os.geteuid() != 0:
        print("pairlb stage-tls: run it as root (the unit's ExecStartPre=+ does)",
              file=sys.stderr)
        return 1
    try:
        copied = stage(args.src, args.dst)
    except (TlsFileError, OSError) as exc:
        print(f"pairlb stage-tls: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"staged {len(copied)} file(s) from {args.src} into {args.dst}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo lives in the lab package, which the runtime never imports: this process
    becomes ``python -m lab.demo`` (same PID, so signals and exit status are the demo's)."""
    import os

    # -P: never the working directory first on sys.path (the demo often runs as root).
    argv = [sys.executable, "-P", "-m", "lab.demo", "--duration", str(args.duration)]
    argv += ["--keep"] if args.keep else []
    argv += ["--cleanup"] if args.cleanup else []
    sys.stdout.flush()
    os.execv(sys.executable, argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pairlb", description="A redundant active/standby HTTP and TCP load balancer."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the load balancer (control process + proxy workers)")
    p.add_argument("-c", "--config", help="TOML config file (default: the embedded demo config)")
    p.add_argument("--workers", type=int, help="override node.workers")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file; print every error")
    p.add_argument("file")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("keygen", help="write a new failover key file (mode 0600)")
    p.add_argument("file", help="e.g. /etc/pairlb/failover.key")
    p.add_argument("--tls-ticket", action="store_true",
                   help="write a TLS session ticket key (80 bytes, hex) instead, for "
                        "[listener.tls] ticket_key_file")
    p.add_argument("--force", action="store_true",
                   help="replace an existing file (atomically); for a running pair follow "
                        "the key rotation procedure in docs/operations.md instead")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("stage-tls", help="copy root's TLS files where the service's user can "
                       "read them (the systemd unit runs it at start and reload)")
    p.add_argument("src", help="e.g. /etc/pairlb/tls")
    p.add_argument("dst", help="e.g. /run/pairlb/tls")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_stage_tls)

    p = sub.add_parser("demo", help="the live demo on the embedded default config")
    p.add_argument("--duration", type=float, default=60.0,
                   help="length of the story in seconds (default 60; every event plays)")
    p.add_argument("--keep", action="store_true", help="leave it running; print the URLs")
    p.add_argument("--cleanup", action="store_true",
                   help="remove what an earlier --keep left running")
    p.set_defaults(func=cmd_demo)

    # -- admin API commands (lb/admin/client.py) --
    from lb.admin import client as admin_client

    admin_client.add_commands(sub)
    # -- end admin API commands --
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
