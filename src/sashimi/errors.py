"""The one exception type users see: a one-line message naming the bad file, key or value."""


class UserError(Exception):
    """Bad input (file, key, value). The CLI prints `error: <message>` and exits with 2."""
