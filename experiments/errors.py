"""The one error type a user sees: a one-line message naming the problem and the fix."""


class UserError(Exception):
    """Bad input or environment. Entry points print it as one line and exit with status 2."""
