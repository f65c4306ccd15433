"""`countersign` — the command line.

Verbs: run, check, explain, demo, reload, approvals, audit, receipt, keys new (README "Running
it"). Exit codes: 0 success, 2 bad configuration or usage, 1 anything else (`explain`: 0 allow,
1 deny, 3 approve; 141 when stdout was closed early).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import ConfigError, Settings, load_settings, summary

DEFAULT_CONFIG = "countersign.yaml"
EXIT_CONFIG = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `yes | head -1`
# The version when the package metadata is unavailable (run from a source tree, not installed).
FALLBACK_VERSION = "0.1.0"


def version() -> str:
    """This installation's version, from the package metadata."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("countersign")
    except PackageNotFoundError:
        return FALLBACK_VERSION


def _config_path(args: argparse.Namespace) -> str:
    return str(args.config or os.environ.get("COUNTERSIGN_CONFIG") or DEFAULT_CONFIG)


def _load(args: argparse.Namespace) -> Settings:
    return load_settings(_config_path(args))


def cmd_check(args: argparse.Namespace) -> int:
    settings = _load(args)
    status = _check_errors(args, settings)
    if status:
        return status
    from .check import config_lines, find_issues

    path = _config_path(args)
    print(f"{path}: OK — {summary(settings)}")
    try:
        lines = config_lines(Path(path).read_text(encoding="utf-8"))
    except OSError:
        lines = {}
    findings = find_issues(settings, lines)
    for finding in findings:
        print(finding.render(path))
    warnings = sum(1 for finding in findings if finding.severity == "warning")
    if warnings and args.strict:
        print(f"{path}: {warnings} warning(s); failing because of --strict", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def _check_errors(args: argparse.Namespace, settings: Settings) -> int:
    """What `check` refuses (0 when nothing): the errors go to stderr, status 2."""
    from .app import check_buildable

    path = _config_path(args)
    # The same composition `run` starts from (policy, routes, store, approvals, Slack, …): what
    # would stop `run` at start-up stops `check`.
    try:
        problems = check_buildable(settings)
    except (ValueError, TypeError) as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if problems:
        for problem in problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args)
    from .server.runner import run

    # An absolute path: SIGHUP re-reads this very file (`countersign reload`).
    return run(settings, config_path=os.path.abspath(_config_path(args)))


def cmd_reload(args: argparse.Namespace) -> int:
    """`countersign reload`: check the configuration as `check` does (errors: exit 2, nothing
    sent), then send SIGHUP to the running `countersign run` named by --pid, --pid-file or the
    configuration's `server.pid_file`; it re-reads its own configuration file."""
    import signal

    settings = _load(args)
    status = _check_errors(args, settings)
    if status:
        return status
    pid: int | None = args.pid
    pid_file = args.pid_file or settings.server.pid_file
    if pid is None:
        if pid_file is None:
            args.usage_error(
                "which process? give --pid PID or --pid-file FILE, or set server.pid_file"
            )
            return EXIT_CONFIG
        try:
            pid = int(Path(pid_file).read_text(encoding="ascii").strip())
        except (OSError, ValueError) as exc:
            print(
                f"countersign reload: cannot read a process id from {pid_file}: {exc}",
                file=sys.stderr,
            )
            return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"countersign reload: no process {pid}", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"countersign reload: not allowed to signal process {pid}", file=sys.stderr)
        return 1
    print(f"{_config_path(args)}: OK; sent SIGHUP to process {pid} (it logs config.reloaded)")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    settings = _load(args)
    from .explain import explain_request

    groups = frozenset(g.strip() for g in (args.groups or "").split(",") if g.strip())
    explained = explain_request(
        settings,
        args.method,
        args.path,
        subject=args.subject,
        groups=groups,
        email=args.email,
        claims=dict(args.claim or []),
        headers=list(args.header or []),
        body=_body(args),
        actions=args.action,
        aws_service=args.aws_service,
    )
    print(explained.json_text() if args.json else explained.text())
    return explained.exit_code


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoListenError, run_demo

    try:
        asyncio.run(run_demo(port=args.port))
    except DemoListenError as exc:
        print(f"countersign demo: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    from .authn.apikeys import key_digest, new_key

    if args.audit:
        return _write_audit_key(args)
    # Checked here rather than by argparse (`required=True`): the audit key needs no subject.
    if args.subject is None or not args.subject.strip():
        example = "agent-7" if args.aws else "agent-ci"
        args.usage_error(
            "--subject is required: the identity the key authenticates as, "
            f"e.g. --subject {example}"
        )
    for option, value in (("--email", args.email), ("--owner", args.owner)):
        if value is not None and not _looks_like_email(value):
            args.usage_error(
                f"{option} must be an email address, e.g. bob@example.com, got {value!r}"
            )
    # JSON strings are valid YAML flow scalars: any subject, group or email is quoted safely.
    groups = ", ".join(json.dumps(g.strip()) for g in (args.groups or "").split(",") if g.strip())
    identity = [f"subject: {json.dumps(args.subject)}", f"groups: [{groups}]"]
    if args.email is not None:
        identity.append(f"email: {json.dumps(args.email)}")
    if args.owner is not None:
        identity.append(f"owner: {json.dumps(args.owner)}")
    if args.aws:
        return _print_aws_key(args.subject, identity)
    key = new_key()
    fields = [f'sha256: "{key_digest(key)}"', *identity]
    print(f"key:    {key}")
    print("        (shown once; give it to the client, it is not stored anywhere)")
    print("config: identity.api_keys entry:")
    print(f"  - {{{', '.join(fields)}}}")
    return 0


def _write_audit_key(args: argparse.Namespace) -> int:
    """`keys new --audit`: an Ed25519 pair for signing the audit trail, written to files."""
    from .audit.signing import new_signing_key

    for option in ("aws", "subject", "email", "owner"):
        if getattr(args, option):
            args.usage_error(f"--audit takes no --{option}: it is the audit trail's key")
    if args.groups:
        args.usage_error("--audit takes no --groups: it is the audit trail's key")
    private_path = Path(args.out)
    public_path = private_path.with_name(private_path.name.removesuffix(".pem") + ".pub.pem")
    for path in (private_path, public_path):
        if path.exists():
            print(f"countersign keys new: {path} exists; not overwriting it", file=sys.stderr)
            return 1
    key = new_signing_key()
    try:
        # Created 0600 from the start: the private key is never readable by others, not even
        # for a moment.
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_pem())
        public_path.write_bytes(key.public_pem())
    except OSError as exc:
        print(f"countersign keys new: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"key id:      {key.key_id}")
    print(f"private key: {private_path} (keep it where only Countersign can read it)")
    print(f"public key:  {public_path} (give it to auditors: audit verify --public-key)")
    print("config: in audit:")
    print(f"  signing_key: {json.dumps(str(private_path.resolve()))}")
    return 0


# An AWS-style access key id: AKIA (a long-term key, as AWS names them), CS (Countersign), and
# 14 characters of the alphabet AWS uses (base32: A-Z, 2-7), 20 in all.
_AWS_KEY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_AWS_SECRET_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _print_aws_key(subject: str, identity: list[str]) -> int:
    """`keys new --aws`: a new access key for an agent, the `identity.aws_keys` entry that
    reads its secret from the environment, and how the agent uses it.

    SigV4 is an HMAC, so Countersign must know the secret itself (not a hash of it): the entry
    names an environment variable rather than holding it.
    """
    import re
    import secrets

    key_id = "AKIACS" + "".join(secrets.choice(_AWS_KEY_ALPHABET) for _ in range(14))
    # 40 characters like AWS's secrets (~238 bits), letters and digits only: no quoting needed
    # in a shell, an env file or YAML.
    secret = "".join(secrets.choice(_AWS_SECRET_ALPHABET) for _ in range(40))
    stem = re.sub(r"[^A-Z0-9]+", "_", subject.upper()).strip("_")
    if not stem.startswith("AGENT"):
        stem = f"AGENT_{stem}" if stem else "AGENT"
    variable = f"{stem}_AWS_SECRET"
    fields = [f'access_key_id: "{key_id}"', f'secret: "${{{variable}}}"', *identity]
    print(f"access key id:     {key_id}")
    print(f"secret access key: {secret}")
    print("                   (shown once; it is not stored anywhere: keep it in a secret store)")
    print("config: identity.aws_keys entry (the secret is read from the environment):")
    print(f"  - {{{', '.join(fields)}}}")
    print("countersign's environment:")
    print(f"  export {variable}={secret}")
    print("the agent's environment (its AWS SDK, CLI or Terraform signs with this key and sends")
    print("to the proxy, on a route with caller_credentials: [aws_sigv4]):")
    print(f"  export AWS_ACCESS_KEY_ID={key_id}")
    print(f"  export AWS_SECRET_ACCESS_KEY={secret}")
    print("  export AWS_ENDPOINT_URL=http://127.0.0.1:8080  # the proxy's URL")
    # boto3 and the AWS CLI v1 read AWS_DEFAULT_REGION, the CLI v2 and Terraform AWS_REGION.
    print("  export AWS_REGION=us-east-1  # any region: the route's aws.region is what AWS sees")
    print("  export AWS_DEFAULT_REGION=us-east-1")
    return 0


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def _body(args: argparse.Namespace) -> bytes | None:
    """`--data TEXT` or `--data @FILE` (curl's spelling), as bytes."""
    data: str | None = args.data
    if data is None:
        return None
    if data.startswith("@"):
        try:
            return Path(data[1:]).read_bytes()
        except OSError as exc:
            raise SystemExit(
                f"countersign explain: cannot read {data[1:]}: {exc.strerror}"
            ) from None
    return data.encode("utf-8")


def _looks_like_email(text: str) -> bool:
    local, at, domain = text.partition("@")
    return bool(at and local and domain) and not any(c.isspace() for c in text)


def _claim(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="countersign",
        description="Identity-aware proxy: AI agents' privileged calls wait for human approval.",
    )
    parser.add_argument("--version", action="version", version=f"countersign {version()}")
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

    p = with_config(
        sub.add_parser(
            "reload",
            help="check a configuration, then make the running proxy reload it (SIGHUP)",
            description="Check the configuration as `check` does (errors: exit 2, nothing sent), "
            "then send SIGHUP to the running `countersign run`, found by --pid, --pid-file, or "
            "the configuration's server.pid_file. The proxy re-reads the file it was started "
            "with; a configuration it cannot build is refused there and the old one kept.",
        )
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--pid", type=int, help="the process id of `countersign run`")
    group.add_argument(
        "--pid-file", metavar="FILE", help="a file holding it (default: server.pid_file)"
    )
    p.set_defaults(func=cmd_reload, usage_error=p.error)

    p = with_config(sub.add_parser("check", help="validate a configuration and exit"))
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 2 when there are warnings (rules that can never match, unreachable paths, "
        "approve rules no one can approve)",
    )
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
    p.add_argument(
        "-H",
        "--header",
        action="append",
        type=_header,
        metavar="'NAME: VALUE'",
        help="a request header (repeat), for header conditions and recognizers",
    )
    p.add_argument(
        "-d", "--data", default=None, metavar="TEXT|@FILE", help="the request body (as curl)"
    )
    p.add_argument(
        "--action",
        action="append",
        metavar="ACTION",
        help="name the request's action outright, e.g. iam:CreateRole (repeat); default: "
        "recognized from the request by the route's protocol",
    )
    p.add_argument(
        "--aws-service",
        default=None,
        metavar="NAME",
        help="on an AWS route: the service the agent signs for (iam, s3, dynamodb, ...)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.description = "Exit status: 0 allow, 1 deny (or refused before the policy), 3 approve."
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("demo", help="run a self-contained demo: sample upstream, proxy, demo keys")
    p.add_argument("--port", type=_port, default=8080, help="proxy port (default 8080)")
    p.set_defaults(func=cmd_demo)

    from . import cli_approvals

    cli_approvals.add_parser(sub, with_config)
    sub.choices["approvals"].set_defaults(func=cli_approvals.main)

    from . import cli_audit

    cli_audit.add_parser(sub)

    from . import cli_receipt

    cli_receipt.add_parser(sub)

    keys = sub.add_parser(
        "keys", help="new API keys, agents' AWS access keys, the audit trail's signing key"
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    p = keys_sub.add_parser(
        "new",
        help="generate a key and print its config line",
        usage="%(prog)s [--aws] --subject SUBJECT [--groups G1,G2] [--email EMAIL] "
        "[--owner EMAIL]\n       %(prog)s --audit [--out PATH]",
        description="Print a new API key (once) and the identity.api_keys line holding its "
        "SHA-256; with --aws, a new AWS access key id and secret for an agent (once) and the "
        "identity.aws_keys line that reads the secret from the environment; with --audit, "
        "write an Ed25519 key pair for audit.signing_key.",
    )
    p.add_argument(
        "--aws",
        action="store_true",
        help="an AWS access key (SigV4) for an agent, instead of an API key",
    )
    p.add_argument(
        "--audit",
        action="store_true",
        help="an Ed25519 key pair that signs the audit trail's checkpoints and receipts, "
        "written to --out and its .pub.pem sibling",
    )
    p.add_argument(
        "--out",
        default="audit-ed25519.pem",
        metavar="PATH",
        help="with --audit: where to write the private key (default audit-ed25519.pem; the "
        "public key goes beside it as audit-ed25519.pub.pem)",
    )
    p.add_argument("--subject", help="the subject the key authenticates as (required)")
    p.add_argument("--groups", default="", help="comma-separated groups")
    p.add_argument(
        "--email",
        help="the person holding this key (an approver's key: who decides, who counts towards "
        "a quorum)",
    )
    p.add_argument(
        "--owner",
        metavar="EMAIL",
        help="the human an agent's key acts for (who then can never decide its requests)",
    )
    p.set_defaults(func=cmd_keys_new, usage_error=p.error)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`... | head -1`): stop quietly. As the Python documentation
        # recommends, point stdout at devnull so the final flush at exit cannot raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
