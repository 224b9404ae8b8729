"""The greenmail code a run measures: a snapshot of the working tree's greenmail/ (put first
on PYTHONPATH for the whole run) and the greenmail/ of a baseline revision exported from git
into a directory of its own; either is selected for a process by its PYTHONPATH."""

from __future__ import annotations

import compileall
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from bench.base import REPO, WORK, BenchError


def digest(root: Path) -> str:
    """A short hash of the greenmail/*.py files below ``root``."""
    h = hashlib.sha256()
    for f in sorted((root / "greenmail").glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def snapshot_greenmail(name: str, reuse: bool) -> str:
    """Run the greenmail code as it is now for the whole run: a copy of greenmail/
    (byte-compiled) first on PYTHONPATH, for the daemon, the CLI and the API calls
    made here. Edits to the working tree during a long run then change nothing.
    A resumed run uses the same copy again."""
    root = snapshot_dir(name)
    if not (reuse and (root / "greenmail").is_dir()):
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(REPO / "greenmail", root / "greenmail", ignore=shutil.ignore_patterns("__pycache__"))
    compileall.compile_dir(root, quiet=1)
    os.environ["PYTHONPATH"] = str(root)
    sys.path.insert(0, str(root))
    return f"snapshot of greenmail/ in {root}, sha256 {digest(root)}"


def snapshot_dir(name: str) -> Path:
    return WORK / "snapshot" / name


def git(*args: str) -> str:
    r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True)
    if r.returncode != 0:
        raise BenchError(f"git {' '.join(args)}: {r.stderr.decode(errors='replace').strip()}")
    return r.stdout.decode()


def export_revision(rev: str) -> tuple[Path, str]:
    """greenmail/ as it is at ``rev``, written (byte-compiled) to WORK/baseline/<commit>/;
    returns that directory (for PYTHONPATH) and the short commit.

    ``git archive`` rather than ``git worktree add``: the repository's .git is shared by
    other worktrees, and an export leaves nothing registered there to clean up if the run is
    interrupted; greenmail/ is all a drain imports."""
    commit = git("rev-parse", "--verify", "--short", f"{rev}^{{commit}}").strip()
    root = WORK / "baseline" / commit
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    r = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit, "greenmail"], capture_output=True
    )
    if r.returncode != 0:
        raise BenchError(f"git archive {commit}: {r.stderr.decode(errors='replace').strip()}")
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tar:
        tar.extractall(root, filter="data")
    compileall.compile_dir(root, quiet=1)
    return root, commit
