"""Exceptions that mean "the user asked for something that cannot work".

The CLI prints these as one line (no traceback) and exits with a non-zero code; everything else is a bug
and keeps its traceback.
"""


class HFCompressError(ValueError):
    """A user-facing error: the message says what is wrong, where, and how to fix it."""


class ConfigError(HFCompressError):
    """A configuration value or recipe key is invalid."""


class DataError(HFCompressError):
    """A text source is missing, empty or too short for what was asked."""


class ModelLoadError(HFCompressError):
    """A path or repo id is not a loadable model/checkpoint."""
