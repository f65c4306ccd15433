"""The parts of the running app that exist only once its event loop runs, as typed app keys.

`proxy.app` sets them at start-up (the lifecycle context); handlers read them from
`request.app`. Typed keys instead of a dict of lambdas: mypy checks every reader, and a part
read before it exists is a KeyError that names it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:  # importing them here would pull Slack's SDK into every process
    from ..authn import Authenticator
    from ..pipeline import ProxyHandler
    from ..slack.app import SlackApp

AUTHENTICATOR: web.AppKey[Authenticator] = web.AppKey("authenticator")
PROXY: web.AppKey[ProxyHandler] = web.AppKey("proxy")
SLACK_APP: web.AppKey[SlackApp] = web.AppKey("slack_app")
