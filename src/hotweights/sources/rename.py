"""Rename a directory into place without ever replacing what is there.

POSIX `rename` silently replaces an empty target directory, so "never overwrite a
version" needs `renameat2(RENAME_NOREPLACE)` (Linux 3.15+, glibc 2.28+). Where that is not
available (another OS, an old libc, a filesystem that refuses the flag) the fallback checks
first and renames after: a non-empty target still fails, and only an empty directory
created in the instant between the two steps could be replaced.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_Renameat2 = Callable[[int, bytes, int, bytes, int], int]


def rename_noreplace(source: Path, target: Path) -> None:
    """Rename `source` to `target`; raise `FileExistsError` (errno EEXIST) if `target`
    exists, or the `OSError` the rename gives."""
    call = _renameat2()
    if call is not None:
        if (
            call(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE)
            == 0
        ):
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(source), None, str(target))
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


@functools.cache
def _renameat2() -> _Renameat2 | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    renameat2: _Renameat2 = function
    return renameat2
