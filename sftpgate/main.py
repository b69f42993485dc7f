"""The command line: one subcommand per job, each taking --config."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import sys
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from .config import Config, ConfigError, load_config
from .logs import setup_logging

T = TypeVar("T")


def _load(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"config error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    return uvloop.run(coro)


def cmd_serve(args: argparse.Namespace) -> int:
    from .layout import DataDirBusy
    from .server import Service

    config = _load(args)
    setup_logging(config.log.format, config.log.level)
    try:
        _run(Service(config).serve_forever())
    except DataDirBusy as exc:
        print(f"sftpgate: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    users = ", ".join(u.name for u in config.sftp.users)
    print(
        f"{args.config}: valid (users: {users}; data_dir: {config.data_path}; immich: {config.immich.url})"
    )
    return _run(check_immich(config)) if args.online else 0


async def check_immich(config: Config) -> int:
    """`check-config --online`: 0 when Immich answers and every key has what it needs."""
    from .immich.client import ImmichClient
    from .immich.settings import inspect_immich

    async with ImmichClient(config.immich.url, timeout_seconds=10) as immich:
        if not await immich.ping():
            print(f"immich: {config.immich.url} does not answer")
            return 1
        report = await inspect_immich(immich, config)
    findings = report.sentences()
    print(f"immich: {config.immich.url} answers" + ("" if findings else "; nothing to change"))
    for finding in findings:
        print(f"  ! {finding}")
    return 1 if report.missing_permissions or any(k.problem for k in report.keys) else 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    from .sftp.server import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("the two passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        print("empty password", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .status import collect_status, format_status

    config = _load(args)
    report = _run(collect_status(config))
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from .status import RetryRefused, retry_undone

    config = _load(args)
    try:
        moved = retry_undone(config, args.paths)
    except RetryRefused as exc:
        print(f"sftpgate retry: {exc}", file=sys.stderr)
        return 2
    for line in moved:
        print(f"queued again: {line}")
    if not moved:
        print("nothing to retry" + (" (no undone file matches)" if args.paths else ""))
        return 1 if args.paths else 0
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    from .optimize import optimize_file

    config = _load(args) if Path(args.config).exists() else None
    opt = config.optimize if config else _default_optimize()
    tz = config.timezone if config else ""
    reports = []
    with tempfile.TemporaryDirectory(prefix="sftpgate-optimize-") as work:
        for name in args.files:
            path = Path(name)
            if not path.is_file():
                reports.append({"file": name, "decision": "unreadable", "reason": "no such file"})
                continue
            result = optimize_file(path, Path(work), opt, tz)
            reports.append(
                {
                    "file": name,
                    "kind": result.kind,
                    "decision": result.decision,
                    "reason": result.reason,
                    "bytes_before": result.bytes_in,
                    "bytes_after": result.bytes_out,
                    "saved_percent": round(100 * (1 - result.bytes_out / result.bytes_in), 1)
                    if result.bytes_in
                    else 0.0,
                    "captured_at": result.captured_at.isoformat() if result.captured_at else None,
                    "metadata_kept": list(result.metadata_kept),
                    "seconds": round(result.seconds, 3),
                }
            )
            if result.output:
                Path(result.output).unlink(missing_ok=True)
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        for r in reports:
            if "kind" not in r:
                print(f"{r['file']}: {r['decision']} — {r['reason']}")
                continue
            print(
                f"{r['file']}: {r['kind']}, {r['decision']} — {r['reason']}\n"
                f"    {r['bytes_before']:,} → {r['bytes_after']:,} bytes ({r['saved_percent']}% saved),"
                f" metadata kept: {', '.join(r['metadata_kept']) or 'none'},"
                f" captured: {r['captured_at'] or 'unknown'}, {r['seconds']} s"
            )
    return 0 if all(r["decision"] != "unreadable" for r in reports) else 1


def _default_optimize() -> object:
    from .config import OptimizeConfig

    return OptimizeConfig()


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    setup_logging("text", "warning" if not args.verbose else "info")
    return int(_run(run_demo(keep=args.keep)))


def cmd_import(args: argparse.Namespace) -> int:
    from .importer import ImportRefused, quiet_logging_level, run_import

    config = _load(args)
    setup_logging(config.log.format, quiet_logging_level(config.log.level, args.verbose))
    try:
        return int(_run(run_import(config, Path(args.dir), user=args.user, keep=args.keep)))
    except ImportRefused as exc:
        print(f"import refused: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sftpgate",
        description="SFTP front door for Immich: receive, optimize, upload, confirm.",
    )
    parser.add_argument(
        "--config", default="config.yaml", help="configuration file (default: config.yaml)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: object, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", default=argparse.SUPPRESS, help="configuration file")
        p.set_defaults(func=fn)
        return p

    add("serve", cmd_serve, "run the service: SFTP server, optimizer, Immich uploads")
    p = add(
        "check-config",
        cmd_check_config,
        "check the configuration file and exit (0 valid, 2 invalid)",
    )
    p.add_argument(
        "--online",
        action="store_true",
        help="also ask Immich: the API keys' permissions, its transcoding and full-size settings"
        " (1 when a key lacks a permission or Immich does not answer)",
    )
    add(
        "hash-password",
        cmd_hash_password,
        "print a salted argon2id hash of a password (read from stdin)",
    )
    p = add(
        "status",
        cmd_status,
        "counts per state, the undone list with reasons, bytes saved, Immich reachability",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add(
        "retry", cmd_retry, "put undone files back into the queue (all, or those matching PATH)"
    )
    p.add_argument(
        "paths", nargs="*", metavar="PATH", help="undone file or client path (default: all)"
    )
    p = add(
        "optimize",
        cmd_optimize,
        "show what would be done to files: kind, decision, size, metadata; uploads nothing",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add(
        "demo",
        cmd_demo,
        "run the whole pipeline here: server, stand-in Immich, a client uploading samples",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the temporary data folder and print its path"
    )
    p.add_argument("--verbose", action="store_true", help="show the service's log lines")
    p = add(
        "import",
        cmd_import,
        "run an existing folder of photos through the pipeline (resumable; --keep leaves it as is)",
    )
    p.add_argument("dir", metavar="DIR", help="folder to import; its subfolders become the path")
    p.add_argument("--keep", action="store_true", help="copy files in; never change DIR")
    p.add_argument("--user", metavar="NAME", help="the sftpgate user (default: the first one)")
    p.add_argument("--verbose", action="store_true", help="also show per-file log lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return int(args.func(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
