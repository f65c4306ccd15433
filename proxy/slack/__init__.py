"""Everything Slack, in one package.

- `limits`: Slack's documented Block Kit and message limits, in one place;
- `mrkdwn`: untrusted text shown literally (escaped, invisible characters made visible, budgeted
  after escaping);
- `blocks`: the approval message, the reason and grant modals, the thread replies and the
  owner's message (pure functions);
- `delivery`: the notifier (a per-channel queue that outlasts outages; each decision, grant and
  outcome replied once in the message's thread; the reminder before expiry on one timer; the
  direct message to the agent's owner), readyz's `SlackHealth`, the start-up `check_setup`;
- `interactions`: what a click does (acknowledged at once, decided after);
- `app`: the slack-bolt `AsyncApp`, its HTTP route on the proxy and its Socket Mode adapter.

Importing this package does not import slack_sdk or slack_bolt; `proxy.app` imports the modules
only when `notify.slack` is configured.
"""
