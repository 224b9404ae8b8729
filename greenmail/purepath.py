"""POSIX path strings spelled the way pathlib spells them, without importing pathlib.

Owns: normalising a path string as ``str(PurePosixPath(p))`` does, joining as
``base / p`` does, and ``.parent``. The enqueue path uses them so that a spool
directory named in the configuration reads the same in its messages as it
does through pathlib (config.py, Spool).
Must not touch: the filesystem.
"""

from __future__ import annotations


def _root(p: str) -> str:
    """The root: two slashes when exactly two lead (POSIX leaves them to the system), else one or none."""
    if not p.startswith("/"):
        return ""
    return "//" if p.startswith("//") and not p.startswith("///") else "/"


def pure(p: str) -> str:
    """``str(PurePosixPath(p))``: no empty or "." components, no trailing slash; "" is "."."""
    root = _root(p)
    rest = "/".join(x for x in p.split("/") if x and x != ".")
    return root + rest if root or rest else "."


def join(base: str, p: str) -> str:
    """``str(PurePosixPath(base) / p)``: ``p`` itself when absolute, else below ``base``."""
    if p.startswith("/"):
        return pure(p)
    head, tail = pure(base), pure(p)
    if tail == ".":
        return head
    if head == ".":
        return tail
    return head + tail if head.endswith("/") else f"{head}/{tail}"


def parent(p: str) -> str:
    """``str(PurePosixPath(p).parent)``: the root and "." are their own parents."""
    p = pure(p)
    root = _root(p)
    rest = p[len(root) :]
    cut = rest.rfind("/")
    if cut < 0:
        return root or "."
    return root + rest[:cut]
