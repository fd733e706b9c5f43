"""The one exception type that the command line turns into a one-line message."""


class UserError(Exception):
    """Bad input from the user: a wrong shape, an unknown mode, a missing or mismatched key.

    The command line prints ``vtm-jax: error: <message>`` and exits non-zero; library callers
    get an ordinary exception with the same message.
    """
