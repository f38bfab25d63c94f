"""The one error type that reaches users: a single line naming the file, key or row at fault."""


class UserError(Exception):
    """Bad input or an unmet precondition; the CLI prints the message alone and exits 2."""
