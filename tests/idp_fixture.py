"""A real OpenID Connect provider for the test suite.

Runs ``tests/idp/server.mjs`` (the npm package ``oidc-provider``) under Node.js as a
subprocess on a free port of 127.0.0.1 and offers helpers for getting tokens from it::

    idp = start_idp(DEFAULT_CLIENTS)
    try:
        token = await idp.token("agent-7")                     # aud = idp.audience
        other = await idp.token("agent-7", resource="https://other.example")
        kid = await idp.rotate()                               # new RSA signing key
        human = await idp.user_token("alice@example.com")      # auth code + PKCE
    finally:
        idp.stop()

Access tokens are RS256 JWTs (``typ: at+jwt``) carrying ``iss``, ``aud``, ``sub`` (the
client_id, or the user for :meth:`TestIdP.user_token`), ``client_id``, ``jti``, ``iat``,
``exp`` (600 s) and every key of the client's / user's ``claims`` as top-level claims.
The JWKS publishes the RSA signing key plus an unused EC P-256 key (distinct ``kid``s).
"""

from __future__ import annotations

import atexit
import base64
import collections
import contextlib
import fcntl
import hashlib
import json
import queue
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final
from urllib.parse import parse_qs, quote, urlencode, urljoin, urlsplit

import aiohttp

__all__ = [
    "DEFAULT_AUDIENCE",
    "DEFAULT_CLIENTS",
    "DEFAULT_USERS",
    "IDP_DIR",
    "INBOX_REDIRECT_URI",
    "PEOPLE_CLIENT_ID",
    "PEOPLE_REDIRECT_URI",
    "IdPError",
    "TestIdP",
    "ensure_node_modules",
    "start_idp",
]

IDP_DIR: Final = Path(__file__).resolve().parent / "idp"
SERVER_SCRIPT: Final = IDP_DIR / "server.mjs"
DEFAULT_AUDIENCE: Final = "countersign"
STARTUP_TIMEOUT: Final = 20.0
NPM_CI_TIMEOUT: Final = 300.0

#: Public client used by :meth:`TestIdP.user_token` (authorization code + PKCE).
PEOPLE_CLIENT_ID: Final = "people"
#: Never contacted: the helper stops following redirects when it reaches this URI.
PEOPLE_REDIRECT_URI: Final = "http://127.0.0.1:9/callback"
#: The web inbox's callback; the people client is "native", so any port of 127.0.0.1 matches.
INBOX_REDIRECT_URI: Final = "http://127.0.0.1/_countersign/ui/callback"


def _client(client_id: str, **claims: Any) -> dict[str, Any]:
    return {"client_id": client_id, "client_secret": f"{client_id}-secret", "claims": claims}


#: Machine clients (client_credentials grant) shared across the test suite.
DEFAULT_CLIENTS: Final[list[dict[str, Any]]] = [
    _client(
        "agent-7",
        groups=["agents"],
        email="agent7@example.com",
        email_verified=True,
        act={"sub": "alice@example.com"},
    ),
    _client("ci-bot", groups=["ci"]),
    _client("alice", groups=["data-owners"], email="alice@example.com", email_verified=True),
    _client("bob", groups=["data-owners"], email="bob@example.com", email_verified=True),
    _client("carol", groups=["data-owners"], email="carol@example.com", email_verified=True),
    _client("mallory"),
    # Identity shapes of the attacks in tests/security/:
    # alice's own credential without an email (she owns agent-7's requests);
    _client("alice-noemail", groups=["data-owners"]),
    # a credential that claims alice's email without the IdP having verified it;
    _client("alice-unverified", groups=["data-owners"], email="alice@example.com"),
    _client(
        "alice-unverified-false",
        groups=["data-owners"],
        email="alice@example.com",
        email_verified=False,
    ),
    # a second subject of carol (another client of hers, the same verified email);
    _client("carol-2", groups=["data-owners"], email="Carol@Example.com", email_verified=True),
    # an agent that names the person it acts for in each token request (token exchange style).
    {**_client("agent-x", groups=["agents"]), "may_act_for": True},
]

#: Human users for the authorization-code flow; ``sub`` is the login name.
DEFAULT_USERS: Final[list[dict[str, Any]]] = [
    {
        "sub": "alice@example.com",
        "claims": {
            "email": "alice@example.com",
            "email_verified": True,
            "groups": ["data-owners"],
        },
    },
    {
        "sub": "bob@example.com",
        "claims": {
            "email": "bob@example.com",
            "email_verified": True,
            "groups": ["data-owners"],
        },
    },
    # A person who approves nothing (the inbox's tests).
    {
        "sub": "mallory@example.com",
        "claims": {"email": "mallory@example.com", "email_verified": True},
    },
]


class IdPError(RuntimeError):
    """The test IdP could not be started or refused a request."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TestIdP:
    """Handle on a running ``tests/idp/server.mjs`` process."""

    __test__ = False  # not a pytest test class, despite the name

    issuer: str
    audience: str

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        clients: Sequence[Mapping[str, Any]],
        process: subprocess.Popen[str],
        workdir: tempfile.TemporaryDirectory[str],
        stderr_tail: collections.deque[str],
        threads: Sequence[threading.Thread],
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self._clients = {str(c["client_id"]): c for c in clients}
        self._process = process
        self._workdir = workdir
        self._stderr_tail = stderr_tail
        self._threads = list(threads)
        self._stopped = False
        atexit.register(self.stop)

    # ------------------------------------------------------------------ endpoints

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/jwks"

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/token"

    @property
    def authorization_endpoint(self) -> str:
        return f"{self.issuer}/auth"

    @property
    def pid(self) -> int:
        return self._process.pid

    def client_secret(self, client_id: str) -> str:
        try:
            client = self._clients[client_id]
        except KeyError:
            raise IdPError(f"unknown test client {client_id!r}") from None
        return str(client.get("client_secret", f"{client_id}-secret"))

    def stderr_tail(self) -> str:
        """The last lines node wrote to stderr (for debugging failing tests)."""
        return "".join(self._stderr_tail)

    # ------------------------------------------------------------------ tokens

    async def token(
        self, client_id: str, resource: str | None = None, *, act_for: str | None = None
    ) -> str:
        """Client-credentials access token (JWT) for ``client_id``.

        Without ``resource`` the audience is :attr:`audience`; otherwise it is
        ``resource`` (must be an absolute URI, e.g. ``https://other.example``).
        """
        body = await self.token_response(client_id, resource=resource, act_for=act_for)
        return str(body["access_token"])

    async def token_response(
        self, client_id: str, resource: str | None = None, *, act_for: str | None = None
    ) -> dict[str, Any]:
        """Like :meth:`token` but returns the whole token endpoint JSON response."""
        secret = self.client_secret(client_id)
        form = {"grant_type": "client_credentials"}
        if resource is not None and resource != self.audience:
            form["resource"] = resource
        if act_for is not None:  # only clients marked "may_act_for" honour it
            form["act_for"] = act_for
        method = self._clients[client_id].get("token_endpoint_auth_method", "client_secret_basic")
        headers = {"Accept": "application/json"}
        if method == "client_secret_post":
            form["client_id"] = client_id
            form["client_secret"] = secret
        else:
            # RFC 6749 section 2.3.1: form-urlencode the parts before base64.
            creds = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(creds).decode("ascii")
        return await self._post_token(form, headers)

    async def user_token(self, login: str, resource: str | None = None) -> str:
        """Access token (JWT) for a human user via authorization code + PKCE.

        ``login`` is the user's ``sub`` (one of the configured users); the IdP's
        headless interaction endpoint logs them in and grants consent.
        """
        verifier = _b64url(secrets.token_bytes(32))
        challenge = _b64url(hashlib.sha256(verifier.encode("ascii")).digest())
        state = secrets.token_urlsafe(16)
        params = {
            "client_id": PEOPLE_CLIENT_ID,
            "response_type": "code",
            "scope": "openid email",
            "redirect_uri": PEOPLE_REDIRECT_URI,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "login_hint": login,
            "state": state,
        }
        if resource is not None and resource != self.audience:
            params["resource"] = resource
        url = f"{self.authorization_endpoint}?{urlencode(params)}"
        # The interaction cookies are set for 127.0.0.1; aiohttp ignores cookies
        # for IP-address hosts unless the jar is "unsafe".
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as session:
            for _ in range(10):
                async with session.get(url, allow_redirects=False) as resp:
                    location = resp.headers.get("Location")
                    if resp.status not in (302, 303) or location is None:
                        text = await resp.text()
                        raise IdPError(f"authorization failed ({resp.status}): {text}")
                url = urljoin(url, location)
                if url.startswith(PEOPLE_REDIRECT_URI):
                    break
            else:
                raise IdPError("authorization flow did not reach the redirect URI")
        query = parse_qs(urlsplit(url).query)
        if "error" in query:
            raise IdPError(f"authorization error: {query}")
        if query.get("state") != [state]:
            raise IdPError(f"state mismatch in authorization response: {query}")
        form = {
            "grant_type": "authorization_code",
            "client_id": PEOPLE_CLIENT_ID,
            "code": query["code"][0],
            "redirect_uri": PEOPLE_REDIRECT_URI,
            "code_verifier": verifier,
        }
        body = await self._post_token(form, {"Accept": "application/json"})
        return str(body["access_token"])

    async def _post_token(
        self, form: Mapping[str, str], headers: Mapping[str, str]
    ) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.token_endpoint, data=dict(form), headers=dict(headers)) as resp,
        ):
            text = await resp.text()
            if resp.status != 200:
                raise IdPError(f"token endpoint returned {resp.status}: {text}")
            body: dict[str, Any] = json.loads(text)
            return body

    # ------------------------------------------------------------------ keys

    async def jwks(self) -> dict[str, Any]:
        """Current JWKS document."""
        async with aiohttp.ClientSession() as session, session.get(self.jwks_uri) as resp:
            resp.raise_for_status()
            body: dict[str, Any] = await resp.json()
            return body

    async def rotate(self, keep_old: bool = False) -> str:
        """Replace the RSA signing key with a fresh one; returns the new ``kid``.

        The old RSA key disappears from the JWKS unless ``keep_old`` is true (then it
        stays published, but new tokens are signed with the new key).
        """
        url = f"{self.issuer}/__test/rotate"
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json={"keep_old": keep_old}) as resp,
        ):
            text = await resp.text()
            if resp.status != 200:
                raise IdPError(f"rotate returned {resp.status}: {text}")
            return str(json.loads(text)["kid"])

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Terminate the node process (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        proc = self._process
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for thread in self._threads:
            thread.join(timeout=2)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        self._workdir.cleanup()

    def __enter__(self) -> TestIdP:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ---------------------------------------------------------------------- startup


def _which(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise IdPError(f"{tool!r} not found on PATH; the test IdP needs Node.js >= 20 and npm")
    return path


def ensure_node_modules() -> None:
    """Run ``npm ci`` in tests/idp unless oidc-provider is already installed."""
    marker = IDP_DIR / "node_modules" / "oidc-provider" / "package.json"
    if marker.exists():
        return
    lock_path = Path(tempfile.gettempdir()) / "countersign-test-idp-npm-ci.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # serialize concurrent test runs / xdist workers
        try:
            if marker.exists():
                return
            result = subprocess.run(
                [_which("npm"), "ci", "--no-audit", "--no-fund"],
                cwd=IDP_DIR,
                capture_output=True,
                text=True,
                timeout=NPM_CI_TIMEOUT,
                check=False,
            )
            if result.returncode != 0:
                raise IdPError(
                    f"`npm ci` in {IDP_DIR} failed ({result.returncode}):\n"
                    f"{result.stdout}\n{result.stderr}"
                )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pump_stdout(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)  # EOF


def _pump_stderr(stream: Any, tail: collections.deque[str]) -> None:
    for line in stream:
        tail.append(line)


def _spawn(
    clients: Sequence[Mapping[str, Any]],
    audience: str,
    users: Sequence[Mapping[str, Any]],
) -> TestIdP:
    port = _free_port()
    issuer = f"http://127.0.0.1:{port}"
    client_configs = [
        {**c, "client_secret": c.get("client_secret", f"{c['client_id']}-secret")} for c in clients
    ]
    config = {
        "port": port,
        "issuer": issuer,
        "audience": audience,
        "clients": client_configs,
        "people": {
            "client_id": PEOPLE_CLIENT_ID,
            "redirect_uris": [PEOPLE_REDIRECT_URI, INBOX_REDIRECT_URI],
            "users": list(users),
        },
    }
    workdir = tempfile.TemporaryDirectory(prefix="countersign-idp-")
    config_path = Path(workdir.name) / "idp.json"
    config_path.write_text(json.dumps(config))

    process = subprocess.Popen(
        [_which("node"), str(SERVER_SCRIPT), str(config_path)],
        cwd=IDP_DIR,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    stdout_lines: queue.Queue[str | None] = queue.Queue()
    stderr_tail: collections.deque[str] = collections.deque(maxlen=200)
    threads = [
        threading.Thread(
            target=_pump_stdout,
            args=(process.stdout, stdout_lines),
            daemon=True,
            name=f"idp-{port}-stdout",
        ),
        threading.Thread(
            target=_pump_stderr,
            args=(process.stderr, stderr_tail),
            daemon=True,
            name=f"idp-{port}-stderr",
        ),
    ]
    for thread in threads:
        thread.start()
    idp = TestIdP(
        issuer=issuer,
        audience=audience,
        clients=client_configs,
        process=process,
        workdir=workdir,
        stderr_tail=stderr_tail,
        threads=threads,
    )

    expected = f"READY {issuer}"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    seen: list[str] = []
    while True:
        remaining = deadline - time.monotonic()
        try:
            line = stdout_lines.get(timeout=max(remaining, 0.0))
        except queue.Empty:
            problem = f"did not print {expected!r} within {STARTUP_TIMEOUT:.0f}s"
            break
        if line is None:
            problem = "exited before becoming ready"
            break
        if line.strip() == expected:
            return idp
        seen.append(line)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=2)
    idp.stop()  # also joins the pump threads, so the stderr tail is complete
    raise IdPError(
        f"test IdP (node {SERVER_SCRIPT.name}, port {port}) {problem}; "
        f"exit code {process.returncode}\n"
        f"--- stdout ---\n{''.join(seen)}--- stderr ---\n{idp.stderr_tail()}"
    )


def start_idp(
    clients: Sequence[Mapping[str, Any]],
    audience: str = DEFAULT_AUDIENCE,
    *,
    users: Sequence[Mapping[str, Any]] = DEFAULT_USERS,
) -> TestIdP:
    """Start the test IdP and wait until it serves requests.

    ``clients``: dicts with ``client_id``, optional ``client_secret`` (default
    ``f"{client_id}-secret"``), optional ``claims`` (copied into access tokens) and
    optional ``token_endpoint_auth_method`` (``client_secret_basic`` by default, or
    ``client_secret_post``). ``users``: dicts with ``sub`` and ``claims`` for
    :meth:`TestIdP.user_token`.
    """
    ensure_node_modules()
    attempts = 3  # the free port can be grabbed by someone else before node binds it
    for attempt in range(attempts):
        try:
            return _spawn(clients, audience, users)
        except IdPError as exc:
            if "EADDRINUSE" not in str(exc) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
