"""One exception type for bad user input: the scripts print its message as one sentence and exit 2."""


class UserError(ValueError):
    """Bad input (path, shape, flag, file). The message says what is wrong and what to do."""
