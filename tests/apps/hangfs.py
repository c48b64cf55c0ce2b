"""A FUSE filesystem whose ``/hang`` never answers ``stat()`` (for 60 s): a hung NFS mount,
for real. Run as ``python hangfs.py MOUNTPOINT``; it prints ``mounted`` once it serves.

The kernel waits for the answer, so whatever stats ``/hang`` is stuck in the kernel, as on
a dead network filesystem. A test ends the hang by aborting the connection
(``/sys/fs/fuse/connections/N/abort``): the stuck calls then fail with ENOTCONN.
"""

from __future__ import annotations

import errno
import stat
import sys
import time
from typing import Any

from mfusepy import FUSE, FuseOSError, Operations

HANG_SECONDS = 60


class HangFS(Operations):  # type: ignore[misc]
    use_ns = True

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path == "/hang":
            time.sleep(HANG_SECONDS)  # the hang itself
            return {"st_mode": stat.S_IFREG | 0o644, "st_nlink": 1}
        raise FuseOSError(errno.ENOENT)

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", "hang"]

    def init(self, path: str) -> None:
        print("mounted", flush=True)


if __name__ == "__main__":
    FUSE(HangFS(), sys.argv[1], foreground=True, nothreads=False)
