"""Errors that carry a message meant for the user, printed as one line."""


class UsageError(Exception):
    """Bad input the user can fix: the message says what is wrong and how to fix it."""


class TargetError(RuntimeError):
    """The target cannot be used at all (refuses the API key, serves no such model): the
    message says what it answered and what to change."""
