"""Slack's documented limits, in one place: the formatter budgets against them and the test fake
(`tests/slack_fake.py`) enforces them.

Sources: the Block Kit reference (docs.slack.dev/reference/block-kit: blocks, block elements,
composition objects, views) and the chat.postMessage / chat.update method pages. Lengths are
counted in UTF-16 code units (`units`), which is never less than Slack's own count: a budget met
here is met there.
"""

from __future__ import annotations

# A message (chat.postMessage, chat.update).
MESSAGE_BLOCKS = 50  # blocks per message
MESSAGE_TEXT = 40_000  # top-level `text`; longer is `msg_too_long`

# Blocks.
SECTION_TEXT = 3_000  # section `text`
SECTION_FIELDS = 10  # section `fields` items
SECTION_FIELD_TEXT = 2_000  # each field's text
HEADER_TEXT = 150  # header plain_text
CONTEXT_ELEMENTS = 10  # context `elements` items
CONTEXT_TEXT = 3_000  # a context text object (a text object's maximum)
ACTIONS_ELEMENTS = 25  # actions `elements` items
BLOCK_ID = 255
TEXT_MIN = 1  # every text object needs at least one character

# Elements.
BUTTON_TEXT = 75
BUTTON_VALUE = 2_000
ACTION_ID = 255

# Views (modals).
VIEW_BLOCKS = 100
VIEW_TITLE = 24  # title, submit, close
VIEW_PRIVATE_METADATA = 3_000
VIEW_CALLBACK_ID = 255
INPUT_LABEL = 2_000
PLAIN_TEXT_INPUT_MAX = 3_000


def units(text: str) -> int:
    """The length of `text` as Slack may count it (UTF-16 code units)."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)
