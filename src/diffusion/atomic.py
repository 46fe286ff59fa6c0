"""Files and folders written atomically: a stage's outputs are the old ones or the new ones, never part of each.

A file is written to a temporary sibling and renamed into place (:func:`atomic_write_bytes`). A folder is built
beside its place and swapped in whole (:func:`staged_dir`, :func:`replace_dir`), after a check that the folder it
replaces holds only what its writer puts there (:func:`check_replaceable`): a stage pointed at the user's images
or at ``.`` must refuse, not delete them. Temporary and set-aside folders carry the writer's pid, so what a killed
process left is recognised (:func:`pid_alive`) and cleaned up or put back by the next run (:func:`recover_dir`).

Used by every stage (the shard writer, the VAE and model exports, the judge, the metrics files), the tracking
module and ``TextToImagePipeline.save_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same folder and :func:`os.replace`.

    ``os.replace`` is atomic on POSIX and Windows when source and target are on the same file system, which a
    sibling file is; readers see the old file or the new one, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically write UTF-8 `text` to `path` (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write `obj` as indented, key-sorted JSON (stable bytes for DVC) with a final newline."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine (a folder or run named after a killed one is stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _dead_siblings(out_dir: Path, kind: str) -> list[Path]:
    """The ``.<name>.<kind>-<pid>`` folders beside `out_dir` of processes that are gone, oldest first."""
    prefix = f".{out_dir.name}.{kind}-"
    dead = [p for p in out_dir.parent.glob(prefix + "*") if p.name[len(prefix):].isdigit()
            and int(p.name[len(prefix):]) != os.getpid() and not pid_alive(int(p.name[len(prefix):]))]
    return sorted(dead, key=lambda p: p.stat().st_mtime)


def remove_stale_temps(out_dir: Path) -> None:
    """Remove temporary folders left by killed runs (their pid is gone) next to `out_dir`."""
    for tmp in _dead_siblings(out_dir, "tmp") + _dead_siblings(out_dir, "old"):
        shutil.rmtree(tmp, ignore_errors=True)


def check_replaceable(out_dir: str | Path, own: Iterable[str], key: str) -> None:
    """Refuse, before any work, an output folder that holds anything but what its writer puts there. The whole
    folder is replaced, so pointed at ``.``, at the folder of the input images or at a folder of other models, it
    would delete them.

    `own` describes what the writer (a stage, or ``save_pretrained``) writes: a name without ``/`` is a file at
    the top (``manifest.json``); a pattern with one (``train/shard-*.tar``, matched as :func:`fnmatch.fnmatchcase`
    on the path below `out_dir`) is a file in a folder. A folder counts as the writer's own only if everything
    in it matches such a pattern (or it is empty): a folder of images merely named ``train/`` or ``val/``, as a
    dataset split into folders is, must not pass for the shard stage's output. (Trusting the writer's manifest
    instead would let a user's folder holding a ``manifest.json`` of its own pass; the contents are what is
    about to be deleted, so they are what is checked.)

    Raises ConfigError naming `key`. A missing folder, or one holding only the writer's own files, passes.
    """
    from diffusion.config import ConfigError

    out = Path(out_dir)
    if out.parent.is_dir():
        recover_dir(out)  # what a killed run set aside is this writer's own output
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{key}: {out} is a file; expected a folder (it need not exist)")
    own = tuple(own)
    foreign = [name for entry in sorted(out.iterdir()) for name in _foreign(entry, entry.name, own)] \
        if out.is_dir() else []
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        # Said of `key`, not of "this stage": save_pretrained, a Python call, checks its folder here too.
        raise ConfigError(f"{key}: {out} holds {listed}, which is not what is written there "
                          f"({', '.join(own)}); the whole folder is replaced, so choose a new or empty one "
                          "(or remove those)")


def _foreign(entry: Path, relative: str, own: tuple[str, ...]) -> list[str]:
    """`relative` (the path of `entry` below the output folder), or what in it, is not the writer's own, per
    `own` (see :func:`check_replaceable`); [] when all of it is. A folder is looked into only if a pattern
    names files inside it: a folder of the user's images holds thousands, and one is enough to refuse it."""
    if not entry.is_dir() or entry.is_symlink():  # a link to a folder is not ours: replacing it drops the link
        return [] if any(fnmatchcase(relative, pattern) for pattern in own) else [relative]
    if not any(pattern.startswith(relative + "/") for pattern in own):
        return [relative + "/"]
    for inner in sorted(entry.iterdir()):
        found = _foreign(inner, f"{relative}/{inner.name}", own)
        if found:
            return found  # the first is enough to refuse; the message names it
    return []


def replace_dir(tmp: Path, out_dir: Path, files: Iterable[tuple[Path, Path]] = ()) -> None:
    """Swap the finished `tmp` folder into `out_dir`, with `files` ((finished file, its place) pairs written
    by the same run, e.g. the shard stage's tokenizer) renamed in with it: the old folder is set aside, the new
    one and the files renamed in, then the old folder deleted.

    Interrupted before the last file is in place (Ctrl-C, an error), the old folder is put back, so the outputs
    are all the old ones or all the new ones. A run killed outright between the renames leaves the old folder
    set aside (``.<name>.old-<pid>``): the next run of the stage puts it back (:func:`recover_dir`).
    """
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    files = list(files)
    if old.exists():
        shutil.rmtree(old)
    try:
        if out_dir.exists():
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        for src, dst in files:
            os.replace(src, dst)
    except BaseException:
        # Not all in place (a file still waits beside its place): back to the old outputs. (`old` exists only
        # if this run set it aside: any earlier one was removed above.)
        if old.exists() and (not out_dir.exists() or any(src.exists() for src, _ in files)):
            if out_dir.exists():
                os.rename(out_dir, tmp)
            os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(out_dir: str | Path, files: Iterable[tuple[Path, Path]] = ()) -> Iterator[Path]:
    """An empty temporary folder beside `out_dir` to write its new contents in, swapped into place with
    :func:`replace_dir` when the block ends. If the block raises (Ctrl-C included), the temporary folder is
    deleted and `out_dir` keeps its old contents: a model folder is never left half written.

    `files`: (temporary file, its place) pairs outside `out_dir` that the block writes too (the shard stage's
    tokenizer); they are renamed in with the folder, and deleted if the block raises.

    The name carries the pid (``.<name>.tmp-<pid>``): two processes saving to one place do not write into the
    same folder, and what a killed process left is removed by the next save (:func:`remove_stale_temps`).
    """
    out, files = Path(out_dir), list(files)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(out)  # first: an output folder a killed swap set aside is put back, not deleted as stale
    remove_stale_temps(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, out, files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap
        for src, _ in files:
            Path(src).unlink(missing_ok=True)  # likewise


def recover_dir(out_dir: str | Path) -> None:
    """Undo what a killed :func:`replace_dir` left: an output folder set aside and never replaced is put back
    (the newest, if several), and folders set aside by runs no longer alive are deleted."""
    out = Path(out_dir)
    dead = _dead_siblings(out, "old")
    if dead and not out.exists():
        try:
            os.rename(dead.pop(), out)
        except FileNotFoundError:
            # Every DDP rank checks its outputs as it starts: another process of this run put it back first.
            if not out.exists():
                raise
    for path in dead:
        shutil.rmtree(path, ignore_errors=True)
