"""The one error type a user sees: a one-line message naming the problem and the fix."""


class UserError(Exception):
    """Bad input or environment. Entry points print it as one line (`cli.run_main`) and exit with
    `exit_code`: 2 for bad input, 1 for a job that ran and failed."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
