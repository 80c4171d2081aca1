"""User-facing errors: a mistake the user can fix, reported without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """One or more problems the user can fix.

    The CLI prints each message on its own line (no traceback) and exits with code 2.
    Each message is one sentence naming the file, key or value and what to do.
    """

    def __init__(self, messages: str | list[str]):
        self.messages = [messages] if isinstance(messages, str) else list(messages)
        super().__init__("\n".join(self.messages))
