"""Errors that reach users as one line (the CLI prints them and exits with code 2, no traceback)."""


class UserError(Exception):
    """Bad input from the user: a missing file, an unknown name, an impossible setting."""


class VerificationError(UserError):
    """A backbone failed the load-time attention check (causal fallback or padding leak)."""
