"""`countersign` — the command line.

Verbs (DESIGN.md section 6): run, check, explain, demo, approvals, audit, keys new. Exit
codes: 0 success, 2 bad configuration or usage, 1 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from .config import ConfigError, Settings, load_settings, summary

DEFAULT_CONFIG = "countersign.yaml"
EXIT_CONFIG = 2


def _config_path(args: argparse.Namespace) -> str:
    return str(args.config or os.environ.get("COUNTERSIGN_CONFIG") or DEFAULT_CONFIG)


def _load(args: argparse.Namespace) -> Settings:
    return load_settings(_config_path(args))


def cmd_check(args: argparse.Namespace) -> int:
    settings = _load(args)
    from .policy import Policy

    Policy.compile(settings.policy)
    print(f"{_config_path(args)}: OK — {summary(settings)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args)
    from .server.runner import run

    return run(settings)


def cmd_explain(args: argparse.Namespace) -> int:
    settings = _load(args)
    from .explain import explain

    groups = frozenset(g.strip() for g in (args.groups or "").split(",") if g.strip())
    report, _ = explain(
        settings,
        args.method,
        args.path,
        subject=args.subject,
        groups=groups,
        email=args.email,
        claims=dict(args.claim or []),
    )
    print(report)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    asyncio.run(run_demo(port=args.port))
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    from .authn.apikeys import key_digest, new_key

    key = new_key()
    groups = ", ".join(g.strip() for g in (args.groups or "").split(",") if g.strip())
    print(f"key:    {key}")
    print("        (shown once; give it to the client, it is not stored anywhere)")
    print("config: identity.api_keys entry:")
    print(f'  - {{sha256: "{key_digest(key)}", subject: "{args.subject}", groups: [{groups}]}}')
    return 0


def _claim(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="countersign",
        description="Identity-aware proxy: AI agents' privileged calls wait for human approval.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "-c",
            "--config",
            help=f"configuration file (default: $COUNTERSIGN_CONFIG or {DEFAULT_CONFIG})",
        )
        return p

    p = with_config(sub.add_parser("run", help="serve the proxy"))
    p.set_defaults(func=cmd_run)

    p = with_config(sub.add_parser("check", help="validate a configuration and exit"))
    p.set_defaults(func=cmd_check)

    p = with_config(
        sub.add_parser("explain", help="show which route and rule a request would match, and why")
    )
    p.add_argument("method", type=str.upper)
    p.add_argument("path")
    p.add_argument("--subject", default="anonymous", help="caller subject (default: anonymous)")
    p.add_argument("--groups", default="", help="comma-separated groups of the caller")
    p.add_argument("--email", default=None)
    p.add_argument(
        "--claim", action="append", type=_claim, metavar="NAME=VALUE", help="extra claim (repeat)"
    )
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("demo", help="run a self-contained demo: sample upstream, proxy, demo keys")
    p.add_argument("--port", type=int, default=8080, help="proxy port (default 8080)")
    p.set_defaults(func=cmd_demo)

    from . import cli_approvals

    cli_approvals.add_parser(sub, with_config)
    sub.choices["approvals"].set_defaults(func=cli_approvals.main)

    from . import cli_audit

    cli_audit.add_parser(sub)

    keys = sub.add_parser("keys", help="manage static API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    p = keys_sub.add_parser("new", help="generate a key and print its config line")
    p.add_argument("--subject", default="agent-ci", help="subject the key authenticates as")
    p.add_argument("--groups", default="", help="comma-separated groups")
    p.set_defaults(func=cmd_keys_new)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
