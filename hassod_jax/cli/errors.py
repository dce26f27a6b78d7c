"""User errors: one line on stderr, `error: ...`, and exit code 2."""

import sys


class UserError(Exception):
    """An error the user can fix from its message alone: shown as one line, exit code 2."""


def user_error_types():
    """The exception types that mean a user error (shown without a traceback)."""
    from hassod_jax import utils
    from hassod_jax.data.images import ImageReadError
    from hassod_jax.weights.torch_reader import CheckpointError

    return (UserError, utils.ConfigError, utils.InputError, CheckpointError, ImageReadError)


def is_user_error(e):
    """True for the types of `user_error_types` and for a FileNotFoundError raised by our own
    checks with a message (those carry no errno; the operating system's always do)."""
    if isinstance(e, FileNotFoundError):
        return e.errno is None
    return isinstance(e, user_error_types())


def fail(message, code=2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
