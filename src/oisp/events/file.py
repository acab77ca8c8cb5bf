"""Payloads of the ``file.*`` events."""

from __future__ import annotations

from typing import Any

import attrs

from oisp.events._record import Record, extra_field

__all__ = ["FileDelete", "FileInfo", "FileOpen", "FileRead", "FileRename", "FileWrite"]


@attrs.frozen(kw_only=True)
class FileInfo(Record):
    """Metadata of a file."""

    path: str | None = None
    name: str | None = None
    extension: str | None = None
    size: int | None = None
    inode: int | None = None
    mode: str | None = None
    uid: int | None = None
    gid: int | None = None
    mtime: str | None = None
    ctime: str | None = None
    is_directory: bool | None = None
    is_symlink: bool | None = None
    symlink_target: str | None = None
    hash: dict[str, str] | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class FileOpen(Record):
    """``file.open``: a file was opened."""

    path: str
    flags: list[str]
    fd: int | None = None
    file: FileInfo | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class FileWrite(Record):
    """``file.write``: a file was written (for example, by an agent's tool)."""

    path: str
    bytes_written: int | None = None
    offset: int | None = None
    truncated: bool | None = None
    created: bool | None = None
    file: FileInfo | None = None
    content_hash: str | None = None
    content_preview: str | None = None
    detected_type: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class FileRead(Record):
    """``file.read``: a file was read."""

    path: str
    bytes_read: int | None = None
    offset: int | None = None
    complete: bool | None = None
    file: FileInfo | None = None
    content_hash: str | None = None
    content_preview: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class FileDelete(Record):
    """``file.delete``: a file was deleted."""

    path: str
    file: FileInfo | None = None
    recursive: bool | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class FileRename(Record):
    """``file.rename``: a file was renamed or moved."""

    old_path: str
    new_path: str
    overwrote: bool | None = None
    file: FileInfo | None = None
    extra: dict[str, Any] = extra_field()
