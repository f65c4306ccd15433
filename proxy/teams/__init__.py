"""Everything Microsoft Teams, in one package, shaped like `slack/`.

- `auth`: every inbound Bot Framework activity's bearer token checked by Countersign itself
  (pyjwt; signing keys from the configurable OpenID metadata; issuer, audience = app id, expiry,
  the `serviceurl` claim, the tenant allow-list);
- `cards`: the approval as an Adaptive Card (pure functions; agent text escaped for the card's
  Markdown, the payload within Teams' size limit, a minimal fallback card, grant inputs where
  the rule allows grants, the owner's direct message);
- `connector`: the Bot Connector REST client (client-credentials token, post, thread reply,
  update, roster, opening a 1:1 conversation);
- `delivery`: the notifier (one card per approval, posted then updated in place, decisions, the
  outcome and a reminder replied in its thread, the owner told in a direct message, with the
  shared retry and `Retry-After` behaviour of `notify.retry`);
- `hosting`: the Microsoft 365 Agents SDK (`CloudAdapter` and an `ActivityHandler`) running each
  verified activity's turn;
- `app`: `POST /_countersign/teams/messages` and what an `Action.Execute` click does (approve,
  deny, approve with a grant).

Not built yet: the grant's thread reply, @-mentions in the reminder.
"""
