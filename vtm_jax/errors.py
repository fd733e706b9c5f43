"""What counts as an expected failure, and the one line the command line prints for it.

Two kinds of exception are expected: :class:`UserError` (bad input, said in words by the code
that found it) and an ``OSError`` about a named file that the user's environment caused (a
read-only directory, a path that is a directory where a file is wanted, a full disk), or a
remote storage failure that names its ``gs://...`` path (epath's backends raise those without
an errno, and ``tf.io.gfile`` raises its own ``OpError`` types). Both end
``vtm-jax`` with ``vtm-jax: error: <one line>`` and exit status 2. Anything else is a bug in
vtm-jax and keeps its traceback, so that it can be reported.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Iterator

# Failures of the file system that a user's paths or disks cause, not vtm-jax.
_ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EIO,
        errno.EEXIST,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.ENOENT,
        errno.ENOSPC,
        errno.EROFS,
        errno.EDQUOT,
        errno.ENAMETOOLONG,
        errno.EFBIG,
        errno.ELOOP,
    }
)


class UserError(ValueError):
    """Bad input from the user: a wrong shape, an unknown mode, a missing or mismatched key.

    The command line prints ``vtm-jax: error: <message>`` and exits non-zero; library callers
    get an ordinary ``ValueError`` with the same message.
    """


def one_line(text: str) -> str:
    """``text`` as one line: its lines joined, so no part of the message is lost."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def expected_failure(error: BaseException) -> str | None:
    """The one-line message for an expected failure, or None for a bug (keep the traceback)."""
    if isinstance(error, UserError):
        return one_line(error) or type(error).__name__
    if (
        isinstance(error, OSError)
        and error.errno in _ENVIRONMENT_ERRNOS
        and getattr(error, "filename", None) is not None
    ):
        return os_error_message(error)
    if _remote_storage_error(error):
        return one_line(error) or type(error).__name__
    return None


# A path with a scheme, as remote storage names the file it failed on (gs://bucket/...).
_REMOTE_PATH = re.compile(r"\b[a-z][a-z0-9+.-]*://\S")
_TF_ERRORS = frozenset(
    {
        "NotFoundError",
        "PermissionDeniedError",
        "UnauthenticatedError",
        "AlreadyExistsError",
        "FailedPreconditionError",
        "ResourceExhaustedError",
        "OutOfRangeError",
    }
)


def _remote_storage_error(error: BaseException) -> bool:
    """A failure of remote storage on a named ``scheme://`` path (the user's bucket or rights).

    epath re-raises ``tf.io.gfile``'s and fsspec's failures as ``FileNotFoundError`` and the
    like with the message only; ``tf.errors`` types pass through some calls unchanged.
    """
    if not _REMOTE_PATH.search(str(error)):
        return False
    if isinstance(error, OSError):
        return error.errno is None or error.errno in _ENVIRONMENT_ERRNOS
    module = type(error).__module__ or ""
    return module.startswith("tensorflow") and type(error).__name__ in _TF_ERRORS


def os_error_message(error: OSError) -> str:
    """``PATH: reason``, as coreutils say it, for a file-system error."""
    path = error.filename
    if getattr(error, "filename2", None) is not None and error.errno == errno.EEXIST:
        path = error.filename2  # os.replace / os.rename: the target is what exists
    return f"{path}: {error.strerror or type(error).__name__}"


# A write that failed for lack of space or a failing disk. A write() on an open file names no
# file; tensorstore (orbax) and TensorFlow say it in their message only.
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS})
_STORAGE_TEXT = (
    ("No space left on device", errno.ENOSPC),
    ("os_error_code='28'", errno.ENOSPC),
    ("Disk quota exceeded", errno.EDQUOT),
    ("File too large", errno.EFBIG),
    ("Input/output error", errno.EIO),
    ("Read-only file system", errno.EROFS),
)


def storage_failure(error: BaseException, path: str) -> OSError | None:
    """A write to ``path`` that failed for lack of space or a failing disk, as the ``OSError``
    naming ``path`` (so it ends in one line, ``PATH: No space left on device``); None for any
    other error, and for one that names its file already."""
    if isinstance(error, OSError) and error.errno is not None:
        if error.errno in _STORAGE_ERRNOS and getattr(error, "filename", None) is None:
            return OSError(error.errno, os.strerror(error.errno), path)
        return None
    text = str(error)
    for words, code in _STORAGE_TEXT:
        if words in text:
            return OSError(code, os.strerror(code), path)
    if "RESOURCE_EXHAUSTED" in text:  # tensorstore's status for a full disk or quota
        return OSError(errno.ENOSPC, "out of storage space (RESOURCE_EXHAUSTED)", path)
    return None


class _DropStorageFailures(logging.Filter):
    """Orbax's threads log each failed write with its traceback before it is raised: those
    records are dropped (the raised error is told in one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f" {record.exc_info[1]}"
        return storage_failure(RuntimeError(text), "") is None


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """A block that writes ``path``: out of space and I/O errors become the ``OSError`` naming
    ``path`` (:func:`storage_failure`), without orbax's logged tracebacks."""
    quiet = _DropStorageFailures()
    logger = logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    except Exception as e:
        failure = storage_failure(e, os.fspath(path))
        if failure is None:
            raise
        raise failure from None
    finally:
        logger.removeFilter(quiet)
