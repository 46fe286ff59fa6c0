"""Where a stage reads shards from: a local folder, or the same folder behind a URL (object storage, a web server).

Every stage that reads shards takes a *location* (``train_vae.shards_dir``, ``encode_latents.shards_dir``,
``train.latents_dir``, ``train_judge.shards_dir``, ``evaluate.shards_dir``) laid out as the stage that wrote
it left it::

    <location>/manifest.json           written with the shards; lists the shard names of each split
    <location>/<split>/<name>.tar      the shards (WebDataset tars), split = train or val

A location is one of:

- a local folder, ``data/latents``: the shards are the ``*.tar`` files found in ``<location>/<split>/``;
- a URL prefix that WebDataset opens (``https://host/data/latents``, ``http://``, ``gs://``): each file is
  ``<location>/<path>``, fetched by WebDataset's ``gopen`` (``curl`` for http(s), ``gsutil`` for ``gs://``).
  A local folder is given as a path, not as a ``file://`` URL (refused, as every scheme ``gopen`` lacks);
- a ``pipe:`` command in which ``{}`` stands for a file's path inside the folder,
  ``pipe:aws s3 cp s3://bucket/data/latents/{} -``: WebDataset runs the command and reads the file from its
  standard output (``pipe:aws s3 cp s3://bucket/data/latents/train/shard-000000.tar -``). Any tool that
  writes an object to stdout works (``aws s3 cp ... -``, ``gsutil cat``, ``rclone cat``, ``curl -s``).

A web server or a bucket cannot be listed in one way that works everywhere, so for a URL the shards are
the ones the manifest names; that is also why a URL location is a folder and not a shard pattern: a stage
reads both splits, which have different shard counts, and the manifest. Upload a folder as the stage wrote
it, e.g. ``aws s3 sync data/latents s3://bucket/data/latents``. Only reading goes through URLs: stages
still write their outputs to local folders (push them with DVC or sync them to the bucket).

The library loaders (``make_loader``, ``make_latent_loader``, ``iter_shards``) take WebDataset URLs
directly: lists and brace patterns (``pipe:aws s3 cp s3://bucket/shard-{000000..000099}.tar -``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

#: Appended to the help of every parameter naming a folder of shards that a stage reads.
URL_HELP = (
    "; or that folder at a URL: https://HOST/PATH (its manifest.json lists the shards), or a pipe: command "
    "with {} for each file's path in it, e.g. 'pipe:aws s3 cp s3://BUCKET/PATH/{} -'"
)

MANIFEST = "manifest.json"
#: Stands for a file's path inside the folder, in a ``pipe:`` location.
PLACEHOLDER = "{}"


def is_remote(location: str) -> bool:
    """Whether `location` is read through WebDataset's ``gopen`` (a ``pipe:`` command or a ``scheme://`` URL)."""
    return str(location).startswith("pipe:") or "://" in str(location)


def _check(location: str) -> None:
    """Refuse a URL WebDataset cannot open before anything is fetched, saying what to write instead."""
    from webdataset.gopen import gopen_schemes

    if location.startswith("pipe:"):
        if PLACEHOLDER not in location:
            raise FileNotFoundError(
                f"{location!r}: a pipe: location needs {PLACEHOLDER} where a file's path in the folder goes, "
                f"e.g. 'pipe:aws s3 cp s3://bucket/data/latents/{PLACEHOLDER} -'"
            )
        return
    scheme = location.split("://", 1)[0]
    if scheme not in gopen_schemes:
        known = ", ".join(sorted(k for k in gopen_schemes if not k.startswith("_")))
        raise FileNotFoundError(
            f"{location!r}: WebDataset cannot open {scheme}:// URLs (it opens {known}); "
            f"use a pipe: command, e.g. 'pipe:aws s3 cp {location.rstrip('/')}/{PLACEHOLDER} -'"
        )


def resolve(location: str, path: str) -> str:
    """The URL (or local path) of the file at `path` (``"train/shard-000000.tar"``) inside `location`."""
    location = str(location)
    if location.startswith("pipe:"):
        return location.replace(PLACEHOLDER, path)
    if is_remote(location):
        return f"{location.rstrip('/')}/{path}"  # not Path(): it would fold "https://" into "https:/"
    return str(Path(location) / path)


def read_manifest(location: str) -> dict[str, Any] | None:
    """The location's ``manifest.json``, or None if it is missing or unreadable (the callers of this use it
    for checks and progress bars only; listing a URL's shards needs it and says so, `list_split`)."""
    location = str(location)
    if not is_remote(location):
        try:
            return json.loads((Path(location) / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
    return _fetch_manifest(location, required=False)


def _fetch_manifest(location: str, *, required: bool) -> dict[str, Any] | None:
    from webdataset import gopen

    _check(location)
    url = resolve(location, MANIFEST)
    try:
        with gopen(url) as stream:  # a failed command (404, no such key) raises on close
            return json.loads(stream.read())
    except (OSError, ValueError) as error:
        if not required:
            return None
        raise FileNotFoundError(f"{url}: cannot read the manifest that lists the shards ({fetch_failure(error)})") \
            from error


#: curl's exit statuses that mean something to a user (curl(1), "EXIT CODES").
CURL_EXITS = {6: "the host name does not resolve", 7: "nothing answers at that host and port",
              22: "the server answered with an HTTP error, e.g. 404: nothing there", 28: "the connection timed out",
              35: "the TLS handshake failed", 56: "the connection broke while reading"}


def fetch_failure(error: Exception) -> str:
    """`error` from webdataset's ``gopen`` in words. A command that fails (curl for http(s), a ``pipe:``) is reported
    as its arguments and ``exit N``; curl's statuses are named (:data:`CURL_EXITS`)."""
    text = str(error)
    found = re.search(r"exit (\d+)", text)
    if found is None:
        return text
    status = int(found.group(1))
    if "'curl'" not in text:
        return f"the command exited {status}"
    return f"curl exited {status}" + (f": {CURL_EXITS[status]}" if status in CURL_EXITS else "")


def list_split(location: str, split: str) -> list[str]:
    """The shards of `split` in `location`, sorted: local paths, or URLs ready for WebDataset.

    Raises:
        FileNotFoundError: a local folder without ``<split>/``, a URL whose manifest cannot be read or does
            not list `split`, or a URL WebDataset cannot open (the message says what to write instead).
    """
    return [url for _, url in split_shards(location, split)]


def require_split(location: str, split: str, key: str, made_by: str, error: type[Exception],
                  what: str = "shards", allow_empty: bool = False) -> list[str]:
    """:func:`list_split`, for a stage's input: the shards, or `error` with a message that names the params
    key, the place looked at and the stage that writes them. Checked before a stage does any work.

    Args:
        location: the folder or URL from the params (``cfg.shards_dir``, ``cfg.latents_dir``).
        key: the params key it came from, as "section.key".
        made_by: the stage that writes these shards ("shard", "encode_latents").
        error: the calling stage's error class, which ``cli.py`` turns into a clean exit.
        what: what the shards are, for the message ("latent shards").
        allow_empty: an existing split with no shards is returned as [] (a val split of a source without
            one, ``shard.val_fraction: 0``); a missing one still raises.
    """
    try:
        urls = list_split(location, split)  # a folder, or a URL
    except FileNotFoundError as e:
        if is_remote(location):  # the message says what was tried and what to write instead
            raise error(f"{key}: {e}") from e
        urls = None
    if urls is None:
        raise error(f"{key}: no {what} in {location}/{split}; run `python cli.py {made_by.replace('_', '-')}` "
                    f"(or `dvc repro {made_by}`) first")
    if not urls and not allow_empty:
        raise error(f"{key}: {location}/{split} exists but holds no {what}: the {split} split is empty (a user "
                    f"source with shard.val_fraction 0, or too few images for it), and this stage needs {split} "
                    "data; raise shard.val_fraction and rerun the shard stage")
    if not is_remote(location) and (problem := _local_split_problem(location, split, urls)):
        raise error(f"{key}: {problem}; rerun `python cli.py {made_by.replace('_', '-')}` (or `dvc repro {made_by}`)")
    return urls


def _local_split_problem(location: str, split: str, paths: list[str]) -> str | None:
    """What is wrong with a local split, before a stage reads it, or None: shards missing from, or absent in, the
    folder's manifest.json (a copy cut short, a file added), or a shard without tar's end-of-archive blocks (a
    file cut short, which tarfile's stream reader can take for a shorter archive and end without an error). One
    stat and one 1 KiB read per shard."""
    listed = ((read_manifest(location) or {}).get("shards") or {}).get(split)
    names = [Path(p).name for p in paths]
    if isinstance(listed, list) and sorted(listed) != names:
        missing, extra = sorted(set(listed) - set(names)), sorted(set(names) - set(listed))
        return (f"{location}/{split} does not hold the shards its manifest.json lists "
                f"(missing: {', '.join(missing) or 'none'}; not listed: {', '.join(extra) or 'none'})")
    for path in paths:
        size = Path(path).stat().st_size
        with open(path, "rb") as fh:
            fh.seek(max(size - 1024, 0))
            tail = fh.read()
        if size % 512 or size < 1024 or tail.count(0) != len(tail):
            return f"{path}: damaged shard (cut short: it does not end with tar's end-of-archive blocks)"
    return None


def split_shards(location: str, split: str) -> list[tuple[str, str]]:
    """``(file name, path or URL)`` of each shard of `split`, sorted by name. The name is the shard's own
    (``shard-000000.tar``), which a ``pipe:`` URL does not end with. Raises as :func:`list_split`."""
    location = str(location)
    if not is_remote(location):
        folder = Path(location) / split
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: shard folder not found")
        return [(p.name, str(p)) for p in sorted(folder.glob("*.tar"))]
    manifest = _fetch_manifest(location, required=True)
    names = (manifest.get("shards") or {}).get(split)
    if names is None:
        raise FileNotFoundError(f"{resolve(location, MANIFEST)}: no shards listed for split {split!r}")
    # The shard stage lists names, encode_latents maps names to sample counts: both iterate as names.
    return [(name, resolve(location, f"{split}/{name}")) for name in sorted(names)]
