"""Shard writer: deterministic bytes, fixed tar headers, round trip, shard sizes, atomic replacement."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion.atomic import atomic_write_json
from diffusion.data.records import Sample
from diffusion.data.shards import list_shards, write_shards


def make_samples(n: int, size: int = 16, offset: int = 0) -> list[Sample]:
    rng = np.random.default_rng(offset)
    return [
        Sample(
            key=f"s{offset + i:05d}",
            image=Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
            caption=f"a caption número {offset + i}",
            meta={"attributes": {"color": "red", "shape": "circle"}, "index": offset + i},
        )
        for i in range(n)
    ]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_rerun_is_byte_identical_and_headers_fixed(tmp_path):
    samples = make_samples(7)
    for fmt in ("png", "jpg"):
        a = write_shards(samples, tmp_path / fmt / "a", samples_per_shard=3, image_format=fmt)
        write_shards(samples, tmp_path / fmt / "b", samples_per_shard=3, image_format=fmt)
        assert [p.name for p in a] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
        assert digests(tmp_path / fmt / "a") == digests(tmp_path / fmt / "b")
    with tarfile.open(a[0]) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["s00000.jpg", "s00000.txt", "s00000.json"]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
    with open(a[0], "rb") as f:
        assert f.read(2) != b"\x1f\x8b"  # not gzip


def test_round_trip_and_counts(tmp_path):
    samples = make_samples(5)
    shards = write_shards(samples, tmp_path / "out", samples_per_shard=2, image_format="png")
    assert shards.counts == [2, 2, 1] and shards.num_samples == 5
    assert shards.summary()["shards"] == {"shard-000000.tar": 2, "shard-000001.tar": 2, "shard-000002.tar": 1}
    assert list_shards(tmp_path / "out") == [str(p) for p in shards]
    read = []
    for path in shards:
        with tarfile.open(path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({name.split(".")[0] for name in files})
        assert len(keys) <= 2
        read += [(k, files[f"{k}.png"], files[f"{k}.txt"], files[f"{k}.json"]) for k in keys]
    assert [r[0] for r in read] == [s.key for s in samples]
    for (key, png, txt, js), s in zip(read, samples):
        assert txt.decode("utf-8") == s.caption
        assert json.loads(js) == s.meta
        assert js.decode() == json.dumps(s.meta, sort_keys=True)
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        np.testing.assert_array_equal(pixels, np.asarray(s.image))  # PNG is lossless


def test_bad_keys_are_refused(tmp_path):
    s = make_samples(1)[0]
    with pytest.raises(ValueError, match="no '.'"):
        write_shards([Sample("a.b", s.image, "x")], tmp_path / "o", samples_per_shard=2)
    with pytest.raises(ValueError, match="duplicate"):
        write_shards([s, s], tmp_path / "o", samples_per_shard=2)
    assert not (tmp_path / "o").exists()


def test_failure_leaves_previous_output_intact(tmp_path):
    out = tmp_path / "shards"
    write_shards(make_samples(4), out, samples_per_shard=2)
    before = digests(out)

    def failing():
        yield from make_samples(3, offset=100)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        write_shards(failing(), out, samples_per_shard=2)
    assert digests(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no temporary folder left

    # A successful run replaces the whole set (no stale shard from the old, larger set survives).
    write_shards(make_samples(1, offset=200), out, samples_per_shard=2)
    assert [p.name for p in out.iterdir()] == ["shard-000000.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_atomic_write_json(tmp_path):
    path = atomic_write_json(tmp_path / "m" / "manifest.json", {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert path.read_text().index('"a"') < path.read_text().index('"b"')
    assert [p.name for p in path.parent.iterdir()] == ["manifest.json"]


def test_training_keys_data_by_the_content_the_manifest_records(tmp_path):
    """tar pads to 10 KiB, so an edited caption keeps the shard's size: the run key must still change
    (else a rerun resumes, and exports, the model of the old data). The manifest's sha256 tells them apart."""
    from diffusion.run_keys import files_fingerprint

    def shard_set(root: Path, caption: str) -> list[str]:
        samples = make_samples(3)
        samples[0] = Sample(samples[0].key, samples[0].image, caption, samples[0].meta)
        written = write_shards(samples, root / "train", samples_per_shard=3)
        atomic_write_json(root / "manifest.json", {"sha256": {"train": written.digests()}})
        return [str(p) for p in written]

    a, b = shard_set(tmp_path / "a", "a red circle"), shard_set(tmp_path / "b", "a blue circle")
    assert [Path(p).stat().st_size for p in a] == [Path(p).stat().st_size for p in b]  # sizes cannot tell
    assert files_fingerprint(a) != files_fingerprint(b)
    assert files_fingerprint(a) == files_fingerprint(shard_set(tmp_path / "c", "a red circle"))


def _dead_pid() -> int:
    """The pid of a process that has exited (what a killed run leaves in its folders' names)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _folder(path, text: str):
    path.mkdir()
    (path / "a.txt").write_text(text)
    return path


@pytest.mark.parametrize("fail_at", ["folder", "file"])
def test_an_interrupted_swap_puts_the_old_outputs_back(tmp_path, monkeypatch, fail_at):
    """Ctrl-C between replace_dir's renames left the output folder missing (the old one set aside, the new one
    deleted by the caller's cleanup), or the new shards beside the old tokenizer. Now all old or all new."""
    import os

    from diffusion.atomic import replace_dir

    out, tok = _folder(tmp_path / "shards", "old"), tmp_path / "tokenizer.json"
    tok.write_text("old")
    new, new_tok = _folder(tmp_path / ".shards.tmp", "new"), tmp_path / ".tokenizer.json.tmp"
    new_tok.write_text("new")
    real_rename, real_replace = os.rename, os.replace

    def rename(src, dst):
        if fail_at == "folder" and str(src).endswith(".shards.tmp"):
            raise KeyboardInterrupt
        return real_rename(src, dst)

    def replace(src, dst):
        if fail_at == "file":
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(new, out, [(new_tok, tok)])
    monkeypatch.undo()
    assert (out / "a.txt").read_text() == "old" and tok.read_text() == "old"
    assert not list(tmp_path.glob(".shards.old-*"))
    replace_dir(new, out, [(new_tok, tok)])  # what the rerun does, from what the interruption left
    assert (out / "a.txt").read_text() == "new" and tok.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards", "tokenizer.json"]


def test_a_killed_swap_is_undone_by_the_next_run(tmp_path):
    """A run killed (SIGKILL) between the renames left the output set aside as .<name>.old-<pid> and the output
    path missing, and a later run never removed it. check_replaceable, before a stage works, puts it back."""
    from diffusion.atomic import check_replaceable

    dead = _dead_pid()
    _folder(tmp_path / f".shards.old-{dead}", "old")
    check_replaceable(tmp_path / "shards", ("a.txt",), "shard.out_dir")
    assert (tmp_path / "shards/a.txt").read_text() == "old"
    # Killed after the new folder was in: the set-aside copy is deleted.
    _folder(tmp_path / f".shards.old-{dead}", "older")
    check_replaceable(tmp_path / "shards", ("a.txt",), "shard.out_dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]
    # A live run's folder is its own business.
    _folder(tmp_path / f".shards.old-{os.getpid()}", "live")
    check_replaceable(tmp_path / "shards", ("a.txt",), "shard.out_dir")
    assert (tmp_path / f".shards.old-{os.getpid()}").exists()


def test_two_ranks_undoing_one_killed_swap_do_not_collide(tmp_path, monkeypatch):
    """Every DDP rank checks the outputs as it starts; the one that lost the race to put the set-aside folder
    back raised FileNotFoundError (and the other ranks then waited out the process group's timeout)."""
    from diffusion import atomic

    set_aside = tmp_path / f".shards.old-{_dead_pid()}"
    _folder(set_aside, "old")
    rename = os.rename

    def another_rank_first(src, dst):  # the other rank renames it between our listing and our rename
        rename(src, dst)
        raise FileNotFoundError(src)

    monkeypatch.setattr(atomic.os, "rename", another_rank_first)
    atomic.check_replaceable(tmp_path / "shards", ("a.txt",), "shard.out_dir")
    assert (tmp_path / "shards/a.txt").read_text() == "old" and not set_aside.exists()


def test_encoding_threads_write_the_same_bytes_and_fail_cleanly(tmp_path, monkeypatch):
    """`workers` threads encode the images ahead of the writing, which keeps the samples' order: the same tars
    as one thread. A bad key still stops at its sample; an encoding error reaches the caller and leaves the
    previous set (the threads stopped, no temporary folder)."""
    import threading

    import diffusion.data.ordered_pool as ordered_pool
    import diffusion.data.shards as shards

    monkeypatch.setattr(ordered_pool, "MIN_SECONDS", 0.0)  # threads even for these 16 px images
    samples = make_samples(100)
    names: set[str] = set()
    real = shards.encode_image

    def encode(image, fmt):
        names.add(threading.current_thread().name)
        time.sleep(0.002)  # a task still runs when the next is submitted: an executor reuses an idle thread first
        return real(image, fmt)

    monkeypatch.setattr(shards, "encode_image", encode)
    for fmt in ("png", "jpg"):
        one = write_shards(samples, tmp_path / fmt / "one", samples_per_shard=30, image_format=fmt)
        three = write_shards(samples, tmp_path / fmt / "three", samples_per_shard=30, image_format=fmt, workers=3)
        assert [p.name for p in three] == [p.name for p in one] and three.counts == one.counts == [30, 30, 30, 10]
        assert digests(tmp_path / fmt / "three") == digests(tmp_path / fmt / "one")
    assert len({n for n in names if n.startswith("shard-encode")}) > 1

    with pytest.raises(ValueError, match="duplicate"):
        write_shards(samples[:9] + samples[:1], tmp_path / "dup", samples_per_shard=5, workers=3)
    out = tmp_path / "png" / "one"
    before = digests(out)
    broken = samples[:40] + [Sample("bad", "not an image", "x")] + samples[40:]
    with pytest.raises(AttributeError):
        write_shards(broken, out, samples_per_shard=5, workers=3)
    assert digests(out) == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    assert not [t for t in threading.enumerate() if t.name.startswith("shard-encode")]
