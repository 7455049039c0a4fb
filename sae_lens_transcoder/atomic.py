"""Directories that are either complete or absent: what readers find is never half-written."""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def replace_dir_atomically(target: Path, fill: Callable[[Path], None]) -> None:
    """Build ``target`` in a fresh directory beside it with ``fill``, then rename it into place.

    An existing ``target`` is swapped out only once the new one is complete, and put back if
    the swap fails; on any error the partial directory is removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    old: Path | None = None
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.rmdir(old)
            os.rename(target, old)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not target.exists():
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
