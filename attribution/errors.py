"""User-facing errors.

Every error a user can cause (a bad path, an unknown name, an out-of-range option) is raised as an
`AttributionError` whose message is one line that says what is wrong and what to do. The CLI prints that line and
exits non-zero; the app shows it in an error box. Anything else is a bug and keeps its traceback, except where a
fan-out quotes a remote task's failure inside its one line (`one_line`).
"""


def one_line(exc: BaseException) -> str:
    """`ErrorType: last line of the message` (at most 200 characters of it): a remote task's failure, whose message
    carries the worker's whole traceback, quoted in one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1][:200]}" if lines else type(exc).__name__


class AttributionError(Exception):
    """Base class: the message is one line meant for the user."""


class DatasetError(AttributionError):
    """An unknown dataset name, a missing or malformed dataset file or folder."""


class ImageError(AttributionError):
    """A file that is not a usable image (not an image, truncated, too large, wrong shape)."""


class CheckpointError(AttributionError):
    """A missing, incomplete or unsupported checkpoint directory."""


class ConfigError(AttributionError):
    """An option outside its allowed range or set."""


class FileFormatError(AttributionError):
    """A file that is missing, empty, corrupt, of the wrong kind (text for an array, an archive without the arrays
    it should hold) or of the wrong shape."""


class CacheMismatchError(AttributionError):
    """A cache folder whose stored configuration differs from the one asked for."""
