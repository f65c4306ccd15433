"""The parts of the running app that exist only once its event loop runs, as typed app keys.

Each key holds a `Slot`, put in the app when it is built (before aiohttp freezes it); the part
goes into its slot at start-up (the lifecycle context), and a reload (SIGHUP) replaces what is in
the slot, never the app's own state (which aiohttp deprecates changing once started). Handlers
read `request.app[KEY].get()`. Typed keys instead of a dict of lambdas: mypy checks every reader,
and a part read before it exists is an error that names it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

from aiohttp import web

if TYPE_CHECKING:  # importing them here would pull Slack's SDK into every process
    from ..authn import Authenticator
    from ..pipeline import ProxyHandler
    from ..slack.app import SlackApp

T = TypeVar("T")


class Slot(Generic[T]):
    """Where one part of the running app goes once it exists."""

    __slots__ = ("_part", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._part: T | None = None

    def get(self) -> T:
        part = self._part
        if part is None:
            raise RuntimeError(f"{self.name} is not running (yet)")
        return part

    def put(self, part: T) -> None:
        self._part = part


AUTHENTICATOR: web.AppKey[Slot[Authenticator]] = web.AppKey("authenticator")
PROXY: web.AppKey[Slot[ProxyHandler]] = web.AppKey("proxy")
SLACK_APP: web.AppKey[Slot[SlackApp]] = web.AppKey("slack_app")


def add_slots(app: web.Application) -> None:
    """Every slot in `app`, empty: called as it is built."""
    app[AUTHENTICATOR] = Slot("the API's authenticator")
    app[PROXY] = Slot("the request path")
    app[SLACK_APP] = Slot("the Slack app")
