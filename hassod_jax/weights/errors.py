"""The error every checkpoint reader raises for a file it cannot read."""


class CheckpointError(ValueError):
    """A file is not a readable checkpoint; the message names the file and the problem."""
