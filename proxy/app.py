"""The one wiring point: builds every part from `Settings` and owns their lifecycles.

Nothing else chooses concrete classes. authn, policy, routing and forward never import each
other; the server handler receives them ready-made.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web

from .approvals.receipts import ReceiptIssuer
from .approvals.service import ApprovalService
from .audit import AuditLog, Sink, StreamSink
from .audit.anchors import AnchorSet, build_anchors
from .audit.file_sink import ChainedFileSink, Signing
from .audit.redact import Redactor
from .audit.signing import load_signing_key
from .authn import Authenticator, SigV4Verifier
from .authn.apikeys import ApiKeyAuthenticator
from .authn.oidc import OIDCVerifier
from .aws_resign import AwsUpstreamSigner
from .config import AwsStaticCredentials, ConfigError, Settings, load_settings_text
from .forward import Forwarder
from .front.aiohttp_front import aiohttp_handler, defer_continue
from .notify import NotifyHub
from .notify.webhook import WebhookNotifier
from .pipeline import ProxyHandler
from .policy import Policy
from .routing import RouteTable
from .server.api import api_routes
from .server.errors_middleware import json_errors
from .server.gate import ApprovalGate
from .server.internal import (
    ADMIN_SERVER,
    READINESS,
    AdminServer,
    Readiness,
    health_routes,
    reserved_routes,
)
from .server.keys import AUTHENTICATOR, PROXY, SLACK_APP, add_slots
from .server.metrics import Metrics
from .store.base import Store
from .store.memory import MemoryStore

if TYPE_CHECKING:
    from .slack.delivery import SlackHealth
    from .teams.delivery import TeamsHealth

_log = structlog.get_logger("countersign")


class StartupError(RuntimeError):
    """A part the configuration names cannot be made to work (e.g. no AWS credentials)."""


SETTINGS_KEY = web.AppKey("settings", Settings)
METRICS_KEY = web.AppKey("metrics", Metrics)
AUDIT_KEY = web.AppKey("audit", AuditLog)
# Set on SIGTERM (proxy.server.runner): the process no longer accepts work and is not ready.
DRAINING = web.AppKey("draining", asyncio.Event)
# The approval gate, which the SIGTERM drain tells to answer held requests at once.
GATE = web.AppKey("gate", ApprovalGate)
# The parts a configuration reload swaps (SIGHUP); present once the app has started.
RELOADER: web.AppKey[Reloader] = web.AppKey("reloader")
# What a reload swaps live; any other section that changed waits for a restart.
RELOADABLE = ("routes", "policy", "identity")
CONFIG_RELOADED = "config.reloaded"
# What readyz reports for Slack (set when `notify.slack` has a bot token).
SLACK_HEALTH: web.AppKey[SlackHealth] = web.AppKey("slack_health")
# What readyz reports for Teams (set when `notify.teams` is set).
TEAMS_HEALTH: web.AppKey[TeamsHealth] = web.AppKey("teams_health")
CONFIG_RELOAD_FAILED = "config.reload_failed"


class Reloader:
    """Applies a new configuration to a running app: routes, policy, identity and forwarding
    (upstreams, injected headers, AWS signers).

    A reload builds a new `ProxyHandler` and `Authenticator` around the parts that live for the
    whole process (forwarder, gate, approvals, audit, metrics) and swaps them in the app:
    requests already running, held ones included, keep the handler they started with and their
    approvals; the next request sees the new configuration. Everything is built before anything
    is swapped, so a configuration that fails to parse or build changes nothing.
    """

    def __init__(
        self,
        app: web.Application,
        settings: Settings,
        *,
        session: aiohttp.ClientSession,
        forwarder: Forwarder,
        gate: ApprovalGate,
        audit_log: AuditLog,
        metrics: Metrics,
        redactor: Redactor | None = None,
    ) -> None:
        self._app = app
        self.settings = settings  # in force: the swapped sections of the last good reload
        self._session = session
        self._forwarder = forwarder
        self._gate = gate
        self._audit = audit_log
        self._metrics = metrics
        self._lock = asyncio.Lock()  # one reload at a time
        self._tasks: set[asyncio.Task[Any]] = set()  # the new issuers' key prefetches
        # The one redactor of every channel (audit, logs, approvals, Slack, webhooks): a reload
        # adds the new configuration's secrets to it. Old ones stay: held requests still use
        # the handler (and injected secrets) they started with.
        self._redactor = redactor
        self._secrets = set(known_secrets(settings))
        self.oidc: OIDCVerifier | None = None  # the identity providers in force (readyz)

    async def build(
        self, settings: Settings, policy: Policy, routes: RouteTable
    ) -> tuple[ProxyHandler, Authenticator, OIDCVerifier]:
        """The request-facing parts for `settings` (signers started); raises `StartupError`
        for an AWS route that cannot sign. Server settings stay those the process started with.
        """
        # AWS routes sign what they forward with real credentials, found before serving: a
        # route that could never sign is an error now, not a 502 on the first request.
        signers = {
            route.name: AwsUpstreamSigner(route.aws) for route in settings.routes if route.aws
        }
        for name, signer in signers.items():
            try:
                await signer.start()
            except RuntimeError as exc:
                raise StartupError(f"route {name}: {exc}") from None
        oidc = OIDCVerifier(
            settings.identity.issuers,
            settings.identity.claims,
            self._session,
            cache_size=settings.identity.token_cache_size,
            refresh_cooldown=settings.identity.jwks_refresh_cooldown_seconds,
        )
        authenticator = Authenticator(
            ApiKeyAuthenticator(settings.identity.api_keys),
            oidc,
            SigV4Verifier(settings.identity.aws_keys),
        )
        handler = ProxyHandler(
            server=self.settings.server,
            authenticator=authenticator,
            routes=routes,
            policy=policy,
            forwarder=self._forwarder,
            audit_log=self._audit,
            metrics=self._metrics,
            gate=self._gate,
            signers=signers,
        )
        return handler, authenticator, oidc

    def install(
        self, handler: ProxyHandler, authenticator: Authenticator, oidc: OIDCVerifier
    ) -> None:
        """Make them the ones new requests use; warm the issuers' keys in the background."""
        self._app[AUTHENTICATOR].put(authenticator)
        self._app[PROXY].put(handler)
        self.oidc = oidc
        task = asyncio.create_task(oidc.prefetch())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self, path: str) -> bool:
        """Read, check and apply the configuration file at `path`; True when applied.

        Refused (logged and audited as `config.reload_failed`, nothing changed) when it does not
        parse, validate or build. Applied: audited as `config.reloaded` with the SHA-256 of the
        file's bytes; sections that cannot change live are named in `restart_needed` (and logged
        as `config.reload_partial`) and keep their running values."""
        async with self._lock:
            digest: str | None = None
            try:
                raw = await asyncio.to_thread(Path(path).read_bytes)
                digest = hashlib.sha256(raw).hexdigest()
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"{path}: the file is not UTF-8 text") from None
                new = load_settings_text(text, path)
                policy = Policy.compile(new.policy)
                routes = RouteTable(new.routes)
                parts = await self.build(new, policy, routes)
            except (ConfigError, OSError, ValueError, TypeError, StartupError) as exc:
                errors = str(exc).splitlines() or [type(exc).__name__]
                _log.error(CONFIG_RELOAD_FAILED, config=path, sha256=digest, errors=errors)
                self._audit.emit(CONFIG_RELOAD_FAILED, config=path, sha256=digest, errors=errors)
                return False
            pending = restart_needed(self.settings, new)
            self.settings = self.settings.model_copy(
                update={name: getattr(new, name) for name in RELOADABLE}
            )
            if self._redactor is not None:
                # Before the new handler serves: its injected secrets are redacted from the
                # first request on.
                self._secrets.update(known_secrets(self.settings))
                self._redactor.set_known_secrets(self._secrets)
            self.install(*parts)
            self._audit.emit(
                CONFIG_RELOADED,
                config=path,
                sha256=digest,
                routes=len(new.routes),
                rules=len(new.policy.rules),
                restart_needed=pending,
            )
            _log.info(CONFIG_RELOADED, config=path, sha256=digest, pid=os.getpid())
            if pending:
                _log.warning(
                    "config.reload_partial",
                    config=path,
                    restart_needed=pending,
                    message="these keys changed but take effect only after a restart",
                )
            return True

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def restart_needed(running: Settings, new: Settings) -> list[str]:
    """The keys outside `RELOADABLE` whose values differ (`section.key`, or the section)."""
    before, after = running.model_dump(), new.model_dump()
    changed: list[str] = []
    for section in before.keys() | after.keys():
        if section in RELOADABLE or before.get(section) == after.get(section):
            continue
        old, cur = before.get(section), after.get(section)
        if isinstance(old, dict) and isinstance(cur, dict):
            changed += [
                f"{section}.{key}"
                for key in old.keys() | cur.keys()
                if old.get(key) != cur.get(key)
            ]
        else:
            changed.append(section)
    return sorted(changed)


def known_secrets(settings: Settings) -> list[str]:
    """Every secret value the configuration itself holds (redacted wherever it appears)."""
    known = [value for route in settings.routes for value in route.inject_headers.values()]
    # Header values like "Bearer abc": the credential part alone must go too.
    known += [part for value in list(known) for part in value.split()[1:]]
    slack = settings.notify.slack
    if slack is not None:
        known += [s for s in (slack.bot_token, slack.signing_secret, slack.app_token) if s]
    teams = settings.notify.teams
    if teams is not None and teams.app_password:
        known.append(teams.app_password)
    known += [w.secret for w in settings.notify.webhooks if w.secret]
    web_login = settings.identity.web_login
    if web_login is not None:
        known += [s for s in (web_login.client_secret, web_login.session_secret) if s]
    for url in (
        settings.store.url,
        settings.audit.redis_url,
        *(a.url for a in settings.audit.anchors),
    ):
        password = urlsplit(url).password if url else None
        if password:
            known.append(password)
    if settings.store.sentinel is not None and settings.store.sentinel.password:
        known.append(settings.store.sentinel.password)
    known += [a.secret for a in settings.audit.anchors if a.secret]
    # The agents' AWS secrets (SigV4 needs them) and the routes' real AWS credentials.
    known += [key.secret for key in settings.identity.aws_keys]
    for route in settings.routes:
        credentials = route.aws.credentials if route.aws is not None else None
        if isinstance(credentials, AwsStaticCredentials):
            known.append(credentials.secret_access_key)
            if credentials.session_token:
                known.append(credentials.session_token)
    return known


def build_redactor(settings: Settings) -> Redactor:
    """Redaction rules, plus every secret value the configuration itself holds."""
    return Redactor(
        extra_patterns=settings.audit.redact.patterns,
        extra_fields=settings.audit.redact.fields,
        known_secrets=known_secrets(settings),
    )


def _closer(anchors: AnchorSet) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        await anchors.aclose()  # the shutdown checkpoint reaches the anchors, within a bound

    return close


def build_audit(
    settings: Settings,
    redactor: Redactor | None = None,
    *,
    worker: int | None = None,
    metrics: Metrics | None = None,
) -> AuditLog:
    """The configured sinks. Opening the chained file reads its tail: call at start-up.

    With `audit.signing_key` the chained file signs checkpoints, sent to the anchors (raises
    SigningKeyError for a key that cannot be used)."""
    audit = settings.audit
    sinks: list[Sink] = []
    signing: Signing | None = None
    anchors: AnchorSet | None = None
    audit_log: AuditLog | None = None  # the anchors report their outages to it, once built

    def anchor_event(name: str, /, **fields: Any) -> None:
        if audit_log is not None:
            audit_log.emit(name, **fields)

    if audit.signing_key:
        key = load_signing_key(audit.signing_key)
        if audit.anchors:
            anchors = build_anchors(
                audit.anchors,
                session=None,
                on_event=anchor_event,
                on_failure=metrics.anchor_failure if metrics is not None else None,
            )
        signing = Signing(
            key,
            interval=audit.checkpoint_seconds,
            on_statement=anchors.send if anchors is not None else None,
            on_checkpoint=metrics.checkpoint if metrics is not None else None,
        )
    if audit.stdout:
        sinks.append(StreamSink(sys.stdout))
    if audit.file:
        path = Path(audit.file)
        if worker is not None:
            # One chain per worker process: a chain has exactly one writer.
            path = path.with_name(f"{path.stem}.worker-{worker}{path.suffix}")
        file_sink = ChainedFileSink(
            path,
            commit_interval=audit.commit_interval_ms / 1000,
            commit_lines=audit.commit_max_events,
            max_bytes=audit.file_max_bytes,
            signing=signing,
        )
        file_sink.open()
        sinks.append(file_sink)
    if audit.redis_stream:
        from .audit.redis_stream import RedisStreamSink

        url = audit.redis_url or settings.store.url
        sinks.append(RedisStreamSink(url, audit.redis_stream, maxlen=audit.redis_stream_maxlen))
    audit_log = AuditLog(
        sinks,
        redactor or build_redactor(settings),
        signing_key=signing.key if signing is not None else None,
        after_close=[] if anchors is None else [_closer(anchors)],
    )
    return audit_log


def build_store(settings: Settings) -> Store:
    store = settings.store
    if store.url == "memory://":
        return MemoryStore(retention_seconds=store.retention_seconds)
    from .store.redis import RedisStore  # only deployments with Redis import redis-py

    return RedisStore(
        store.url,
        key_prefix=store.key_prefix,
        retention_seconds=store.retention_seconds,
        timeout_seconds=store.timeout_seconds,
        max_connections=store.max_connections,
        mode=store.mode,
        sentinel_master=None if store.sentinel is None else store.sentinel.master,
        sentinel_nodes=() if store.sentinel is None else store.sentinel.addresses,
        sentinel_password=None if store.sentinel is None else store.sentinel.password,
    )


async def start_slack(
    settings: Settings,
    approvals: ApprovalService,
    store: Store,
    notify: NotifyHub,
    session: aiohttp.ClientSession,
    app: web.Application,
    metrics: Metrics | None = None,
) -> list[Any]:
    """The Slack notifier and interaction handlers, when `notify.slack` has a bot token.

    Returns the parts to close on shutdown."""
    slack = settings.notify.slack
    if slack is None or not slack.bot_token:
        return []
    from slack_sdk.web.async_client import AsyncWebClient

    from .slack.app import SlackApp
    from .slack.delivery import CALL_TIMEOUT, SlackHealth, SlackNotifier, check_setup
    from .slack.interactions import SlackActions

    # retry_handlers=[]: our own backoff (slack/delivery.py) decides what is retried and how
    # long. No shared session: slack_sdk applies its own per-call timeout only to the session
    # it opens itself (a shared session keeps that session's far longer bound).
    client = AsyncWebClient(
        token=slack.bot_token,
        base_url=slack.api_url,
        retry_handlers=[],
        timeout=int(CALL_TIMEOUT),
    )
    app[SLACK_HEALTH] = health = SlackHealth(client)
    if slack.channel:
        notify.add(
            SlackNotifier(
                client,
                slack.channel,
                store,
                public_url=settings.server.public_url,
                redactor=approvals.redactor,
                health=health,
                on_fallback=metrics.slack_fallback if metrics is not None else None,
            )
        )
    actions = SlackActions(client, approvals, settings.approvals.groups)
    bolt = SlackApp(client, actions, signing_secret=slack.signing_secret, app_token=slack.app_token)
    app[SLACK_APP].put(bolt)
    # The setup is checked in the background: what is wrong is logged, never fatal.
    bolt.start(check_setup(client, slack.channel, health=health))
    return [bolt]


def start_teams(
    settings: Settings,
    approvals: ApprovalService,
    store: Store,
    notify: NotifyHub,
    session: aiohttp.ClientSession,
    app: web.Application,
    metrics: Metrics | None = None,
) -> None:
    """The Teams notifier and the activity handler, when `notify.teams` is set."""
    teams = settings.notify.teams
    if teams is None or not teams.enabled:
        return
    from .teams.app import TEAMS_BOT, TeamsBot
    from .teams.auth import ActivityVerifier
    from .teams.connector import BotConnector
    from .teams.delivery import TeamsHealth, TeamsNotifier

    assert teams.app_id and teams.app_password and teams.tenant_id and teams.conversation
    connector = BotConnector(
        session, app_id=teams.app_id, app_password=teams.app_password, token_url=teams.token_url
    )
    app[TEAMS_HEALTH] = TeamsHealth(connector)
    notify.add(
        TeamsNotifier(
            connector,
            store,
            service_url=teams.service_url,
            conversation=teams.conversation,
            public_url=settings.server.public_url,
            redactor=approvals.redactor,
            on_fallback=metrics.teams_fallback if metrics is not None else None,
            tenant_id=teams.tenant_id,
        )
    )
    verifier = ActivityVerifier(teams.app_id, teams.tenant_id, teams.openid_metadata_url, session)
    app[TEAMS_BOT] = TeamsBot(
        verifier,
        connector,
        approvals,
        service_url=teams.service_url,
        conversation=teams.conversation,
        tenant_id=teams.tenant_id,
        public_url=settings.server.public_url,
    )


def build_receipts(
    settings: Settings, approvals: ApprovalService, audit_log: AuditLog
) -> tuple[ReceiptIssuer | None, str | None]:
    """The receipt issuer when `audit.signing_key` is set, or why its key cannot be used (the
    start-up fails with that sentence)."""
    path = settings.audit.signing_key
    if path is None:
        return None, None
    key = audit_log.signing_key  # the one the trail's checkpoints are signed with
    if key is None:
        from .audit.signing import SigningKeyError, load_signing_key

        try:
            key = load_signing_key(path)
        except SigningKeyError as exc:
            return None, f"audit.signing_key: {exc}"
    public_url = settings.server.public_url
    issuer = ReceiptIssuer(
        key, approvals, audit_log, issuer=public_url or "countersign", public_url=public_url
    )
    return issuer, None


def check_buildable(settings: Settings) -> list[str]:
    """Build what `run` builds before it serves, without opening sockets or sinks and without an
    event loop: an error `run` would hit at start-up is raised here, so `countersign check`
    finds it. Returns problems that are not errors of the configuration itself but would stop
    `run` on this machine (the audit file's directory, its last line)."""
    build_app(settings, audit_log=AuditLog([]))
    problems: list[str] = []
    if settings.audit.signing_key:
        from .audit.signing import SigningKeyError, load_signing_key

        try:
            load_signing_key(settings.audit.signing_key)
        except SigningKeyError as exc:
            problems.append(f"audit.signing_key: {exc}")
    if settings.audit.file:
        path = Path(settings.audit.file)
        directory = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
        if directory is None or not os.access(directory, os.W_OK):
            problems.append(f"audit.file: cannot create or write {path}")
        elif path.exists():
            from .audit.chain import ChainError, last_head_of

            try:
                last_head_of(path)
            except (ChainError, OSError) as exc:
                problems.append(f"audit.file: {exc}")
    return problems


def build_app(
    settings: Settings,
    *,
    audit_log: AuditLog | None = None,
    worker: int | None = None,
    redactor: Redactor | None = None,
) -> web.Application:
    """An aiohttp application serving the proxy for `settings`.

    Parts that need a running loop (the upstream connection pool) are created on startup and
    closed on cleanup. `redactor` (default: `build_redactor(settings)`) is shared by audit,
    approvals and notifiers, and a reload updates its secrets; `run` passes its logs' one.
    """
    redactor = redactor if redactor is not None else build_redactor(settings)
    metrics = Metrics()
    if audit_log is None:
        audit_log = build_audit(settings, redactor, worker=worker, metrics=metrics)
    policy = Policy.compile(settings.policy)  # compiled once; errors surface before serving
    routes = RouteTable(settings.routes)
    # client_max_size bounds only bodies the proxy itself reads (API calls); proxied bodies
    # are streamed and never read whole.
    app = web.Application(client_max_size=settings.server.max_body_bytes, middlewares=[json_errors])
    add_slots(app)
    app[SETTINGS_KEY] = settings
    app[METRICS_KEY] = metrics
    app[AUDIT_KEY] = audit_log
    app[DRAINING] = asyncio.Event()
    # readyz answers 503 once DRAINING is set.
    readiness = app[READINESS] = Readiness(drain=app[DRAINING])
    store = build_store(settings)
    notify = NotifyHub(on_failure=metrics.notify_failure)
    approvals = ApprovalService(
        store, settings.approvals, audit_log, redactor=redactor, notify=notify, metrics=metrics
    )
    receipts, receipts_error = build_receipts(settings, approvals, audit_log)
    gate = ApprovalGate(
        approvals,
        settings.server.max_body_bytes,
        settings.approvals.max_held_bytes,
        receipts=receipts,
    )
    app[GATE] = gate

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        if receipts_error is not None:  # a key that cannot sign stops the start-up
            raise StartupError(receipts_error)
        forwarder = Forwarder(
            connect_timeout=settings.server.upstream_connect_timeout_seconds,
            read_timeout=settings.server.upstream_timeout_seconds,
        )
        # Discovery, JWKS, webhooks and Slack share one general-purpose client; proxied traffic
        # has its own lean one (the forwarder).
        session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        reloader = Reloader(
            app,
            settings,
            session=session,
            forwarder=forwarder,
            gate=gate,
            audit_log=audit_log,
            metrics=metrics,
            redactor=redactor,
        )
        try:
            # Signers are started first: a route that could never sign stops the start-up.
            parts = await reloader.build(settings, policy, routes)
        except StartupError:
            await session.close()
            await forwarder.aclose()
            raise
        app[RELOADER] = reloader
        for hook in settings.notify.webhooks:
            notify.add(
                WebhookNotifier(
                    hook.url,
                    hook.secret,
                    session,
                    redactor,
                    public_url=settings.server.public_url,
                )
            )
        slack = await start_slack(settings, approvals, store, notify, session, app, metrics)
        start_teams(settings, approvals, store, notify, session, app, metrics)
        reloader.install(*parts)
        approvals.start()
        readiness.started = True
        try:
            yield
        finally:
            readiness.started = False
            await reloader.aclose()
            for part in slack:
                await part.aclose()
            if receipts is not None:
                await receipts.aclose()
            await approvals.aclose()
            await notify.aclose()
            await session.close()
            await store.aclose()
            await forwarder.aclose()
            await audit_log.aclose()

    app.cleanup_ctx.append(lifecycle)

    async def store_state() -> str:
        # Reported, never failing readiness: every replica shares the store (DESIGN §5).
        return "ok" if await store.ping() else "down"

    async def idp_state() -> str:
        # The identity providers in force (a reload swaps them); probes are cached and bounded.
        reloader = app.get(RELOADER)
        oidc = reloader.oidc if reloader is not None else None
        if oidc is None:  # not started yet
            return "unknown" if settings.identity.issuers else "not configured"
        return await oidc.health()

    async def slack_state() -> str:
        probe = app.get(SLACK_HEALTH)
        return "not configured" if probe is None else await probe.state()

    dependencies = {"store": store_state, "idp": idp_state, "slack": slack_state}
    if settings.notify.teams is not None and settings.notify.teams.enabled:

        async def teams_state() -> str:
            probe = app.get(TEAMS_HEALTH)
            return "unknown" if probe is None else await probe.state()

        dependencies["teams"] = teams_state
    health = health_routes(metrics, readiness, dependencies)
    admin = settings.server.admin_address
    if admin is None:
        app.router.add_routes(health)
    else:
        # Health and metrics on their own listener (runner.start starts it); the public port
        # answers them 404.
        admin_app = web.Application()
        admin_app.router.add_routes(health)
        admin_app.router.add_routes(reserved_routes())
        app[ADMIN_SERVER] = AdminServer(admin_app, *admin)
        app.on_cleanup.append(app[ADMIN_SERVER].stop)
    app.router.add_routes(reserved_routes())
    app.router.add_routes(api_routes(approvals, receipts))
    from .ui import setup_ui  # the approvers' web inbox (identity.web_login)

    setup_ui(app, settings, approvals, notify.add)
    slack_settings = settings.notify.slack
    if slack_settings is not None and slack_settings.signing_secret:
        from .slack.app import slack_routes

        app.router.add_routes(slack_routes(slack_settings.signing_secret))
    teams_settings = settings.notify.teams
    if teams_settings is not None and teams_settings.enabled:
        from .teams.app import teams_routes

        app.router.add_routes(teams_routes())
    # [\s\S] and not ".": a decoded path may hold a newline, and such a request must still reach
    # the proxy handler to be refused with a clear 400 rather than aiohttp's plain-text 404.
    # `100 Continue` only once a request is judged (Incoming.send_continue). `countersign run`
    # serves proxied paths on its own front (proxy.front); this route serves them when the
    # app alone is driven (in-process tests).
    proxy = aiohttp_handler(lambda request: request.app[PROXY].get().handle)
    app.router.add_route("*", r"/{tail:[\s\S]*}", proxy, expect_handler=defer_continue)
    return app
