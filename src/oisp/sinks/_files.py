"""File chores the file-writing sinks share (``jsonl``, the ``webhook`` spool): private directories, durable
renames, deletions that never raise."""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["PRIVATE_DIR_MODE", "fsync_directory", "remove_quietly"]

logger = logging.getLogger(__name__)

#: Directories that hold events are the owner's alone.
PRIVATE_DIR_MODE = 0o700


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform opens directories; elsewhere a rename is as
    durable as it gets)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_quietly(path: Path, what: str) -> None:
    """Delete ``path``; gone already is fine, any other failure is logged (as ``what``), never raised."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("%s: could not delete %s: %s", what, path, exc)
