"""Everything Microsoft Teams, in one package, shaped like `slack/`.

- `auth`: every inbound Bot Framework activity's bearer token checked by Countersign itself
  (pyjwt; signing keys from the configurable OpenID metadata; issuer, audience = app id, expiry,
  the `serviceurl` claim, the tenant allow-list);
- `cards`: the approval as an Adaptive Card (pure functions; agent text escaped for the card's
  Markdown, the payload within Teams' size limit, a minimal fallback card);
- `connector`: the Bot Connector REST client (client-credentials token, post, thread reply,
  update, roster);
- `delivery`: the notifier (one card per approval, posted then updated in place, decisions, the
  outcome and a reminder replied in its thread, with the shared
  retry and `Retry-After` behaviour of `notify.retry`);
- `app`: `POST /_countersign/teams/messages` and what an `Action.Execute` click does.

Not built yet: hosting on the Microsoft 365 Agents SDK, the owner's direct message, grants.
"""
