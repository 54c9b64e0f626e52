"""Backup files shared by the packs that write them: timestamped names, sha256 checksum files in
`sha256sum` format, copies through a temporary name, free-space checks and pruning."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from pathlib import Path

from taskcore.core.errors import ActionFailed

log = logging.getLogger(__name__)
FREE_SPACE_MARGIN = 1.1  # a backup directory needs this many times the expected size free


def safe_label(text: str) -> str:
    """`text` usable in a file name: anything but letters, digits, `.`, `_` and `-` becomes `_`."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).strip(".") or "_"


def backup_name(label: str, suffix: str, now: float | None = None) -> str:
    """`<label>-<UTC yyyymmddThhmmssZ><suffix>`: names sort by time."""
    return f"{safe_label(label)}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}{suffix}"


def checksum_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.sha256")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksum(path: Path, digest: str) -> Path:
    """Write `<path>.sha256` in `sha256sum` format (through a temporary name)."""
    target = checksum_path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(f"{digest}  {path.name}\n")
    tmp.replace(target)
    return target


def verify_checksum(path: Path, step: str) -> str:
    """Re-read `path` against its `.sha256` file; ActionFailed when it is missing or differs."""
    try:
        recorded = checksum_path(path).read_text().split()[0]
        actual = sha256_file(path)
    except (OSError, IndexError) as e:
        raise ActionFailed(step, f"cannot verify {path}: {e}") from e
    if actual != recorded:
        raise ActionFailed(step, f"{path} does not match its checksum: sha256 {actual}, recorded {recorded}")
    return actual


def copy_with_digest(source: Path, target: Path) -> str:
    """Copy `source` to `target` (through a temporary name, fsynced) and write its checksum file;
    returns the sha256."""
    if target.exists():
        raise ActionFailed("execute_action", f"{target} already exists")
    tmp = target.with_name(f".{target.name}.tmp")
    digest = hashlib.sha256()
    try:
        with source.open("rb") as src, tmp.open("wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        tmp.replace(target)
        write_checksum(target, digest.hexdigest())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ActionFailed("execute_action", f"copying {source} to {target}: {e}") from e
    return digest.hexdigest()


def require_dir(directory: Path, need_bytes: int, step: str) -> None:
    """ActionFailed unless `directory` exists, is writable and has room for `need_bytes` (with margin)."""
    if not directory.is_dir():
        raise ActionFailed(step, f"backup directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ActionFailed(step, f"backup directory {directory} is not writable")
    free = shutil.disk_usage(directory).free
    if free < need_bytes * FREE_SPACE_MARGIN:
        raise ActionFailed(
            step, f"backup directory {directory} has {free} bytes free, {need_bytes} needed (plus 10%)"
        )


def prune_backups(directory: Path, label: str, suffix: str, keep: int) -> list[Path]:
    """Remove all but the newest `keep` backups named by `backup_name(label, suffix)` (files or
    directories) with their checksum files; returns what was removed."""
    pattern = re.compile(rf"{re.escape(safe_label(label))}-\d{{8}}T\d{{6}}Z{re.escape(suffix)}")
    found = sorted(p for p in directory.iterdir() if pattern.fullmatch(p.name))
    removed = found[: max(len(found) - keep, 0)]
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        checksum_path(path).unlink(missing_ok=True)
        log.info("pruned backup %s", path)
    return removed
