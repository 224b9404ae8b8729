"""The settings a submission needs, kept compiled beside the configuration file.

``greenmail enqueue`` and ``sendmail`` run as one process per message, and
parsing the configuration (tomllib and the typed Config) costs more than the
rest of the enqueue together. So every full load that may write beside the
configuration leaves ``.NAME.cache`` there: the few settings a submission
uses, in marshal form (no parser), keyed by the device, inode, size and
modification time of the configuration file and of every file those
settings came from. A submission uses it only while that key still holds and
the cache is trustworthy (a regular file owned by root or by the
configuration's owner, writable by no one else); otherwise it loads the
configuration in full, as every other command does.
Owns: finding the configuration file, and writing and reading the cache.
Must not touch: what the settings mean (config.py), the queue.
"""

from __future__ import annotations

import marshal
import os

ENV_VAR = "GREENMAIL_CONFIG"
DEFAULT_PATHS = ("/etc/greenmail/greenmail.toml",)
VERSION = 3

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any


def find(path: str | None, defaults: Sequence[str] = DEFAULT_PATHS) -> str | None:
    """The configuration file to use: the argument, $GREENMAIL_CONFIG, or the first default that exists."""
    if path:
        return path
    env = os.environ.get(ENV_VAR)
    if env:
        return env
    return next((d for d in defaults if os.path.exists(d)), None)


def cache_path(config: str) -> str:
    head, tail = os.path.split(os.path.abspath(config))
    return os.path.join(head, f".{tail}.cache")


def _key(files: Sequence[str]) -> list[Any]:
    out: list[Any] = []
    for f in files:
        try:
            st = os.stat(f)
            out.append((f, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((f, None))
    return out


def read(config: str) -> dict[str, Any] | None:
    """The cached settings for ``config``, or None when there are none that can be trusted now."""
    path = cache_path(config)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        owner = os.stat(config).st_uid
        if st.st_uid not in (0, owner) or st.st_mode & 0o022 or not os.path.isfile(path):
            return None
        data = marshal.loads(os.read(fd, st.st_size + 1))
    except (OSError, ValueError, EOFError, TypeError):
        return None
    finally:
        os.close(fd)
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return None
    files = data.get("files", [])
    if _key([os.path.abspath(config), *files]) != data.get("key"):
        return None
    settings = data.get("settings")
    return settings if isinstance(settings, dict) else None


def store(config: str, settings: dict[str, Any], files: Sequence[str] = ()) -> None:
    """Leave the cache for ``config`` (best effort: where it cannot be written, nothing happens)."""
    path = cache_path(config)
    absolute = os.path.abspath(config)
    data = {"version": VERSION, "files": list(files), "key": _key([absolute, *files]), "settings": settings}
    if read(config) == settings:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, marshal.dumps(data))
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        try:  # noqa: SIM105 - contextlib would be one more import on the submission path
            os.unlink(tmp)
        except OSError:
            pass
