"""Streaming loader: batch format, exact epoch length (also with workers), seeding, caption dropout,
ordered reading, and a 2-process gloo DDP run that would hang if the ranks' batch counts differed."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.data.loader import make_loader
from diffusion.data.records import Sample
from diffusion.data.shard_reading import iter_shards
from diffusion.data.shards import write_shards
from diffusion.data.tokenizer import PAD_ID, encode, null_tokens, save_tokenizer, train_tokenizer

SIZE = 8
COLOURS = ("red", "green", "blue", "yellow")


def make_samples(n: int, start: int = 0) -> list[Sample]:
    out = []
    for i in range(start, start + n):
        colour = COLOURS[i % 4]
        pixels = np.full((SIZE, SIZE, 3), i % 256, dtype=np.uint8)
        out.append(Sample(f"k{i:05d}", Image.fromarray(pixels), f"a {colour} square number {i}", {"i": i}))
    return out


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([s.caption for s in make_samples(40)], vocab_size=80, max_length=12)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Four shards with unequal sample counts: 3, 5, 7 and 9 (24 samples)."""
    root = tmp_path_factory.mktemp("shards")
    paths, start = [], 0
    for i, n in enumerate((3, 5, 7, 9)):
        paths += write_shards(make_samples(n, start), root / f"part{i}", samples_per_shard=n, prefix=f"p{i}")
        start += n
    return [str(p) for p in paths]


def keys_of(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_batch_format_and_epoch_length(shards, tok):
    loader = make_loader(shards, tok, batch_size=4, epoch_steps=5, shuffle_buffer=10)
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    b = batches[0]
    assert b["image"].shape == (4, 3, SIZE, SIZE) and b["image"].dtype == torch.float32
    assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
    assert len(b["caption"]) == len(b["meta"]) == 4
    # Tokens: the captions' encoding without the padding columns all four share (trim_padding).
    full = encode(tok, b["caption"])  # (4, max_length 12)
    longest = int((full != PAD_ID).sum(dim=1).max())
    assert b["tokens"].dtype == torch.long and b["tokens"].shape == (4, longest) and longest < 12
    assert torch.equal(b["tokens"], full[:, :longest]) and (full[:, longest:] == PAD_ID).all()
    # Pixels decode to the value written: every pixel of sample i is i, i.e. i / 127.5 - 1.
    i = b["meta"][0]["i"]
    assert torch.allclose(b["image"][0], torch.full((3, SIZE, SIZE), i / 127.5 - 1.0))
    assert b["caption"][0] == f"a {COLOURS[i % 4]} square number {i}"
    assert len(list(loader)) == 5  # a second epoch has the same length


def test_seeded_streams(shards, tok):
    def run(seed):
        loader = make_loader(shards, tok, batch_size=3, epoch_steps=4, seed=seed, shuffle_buffer=8)
        return keys_of(loader), keys_of(loader)  # two epochs

    a, b = run(0), run(0)
    assert a == b  # reproducible
    assert a[0] != a[1]  # each epoch draws a new stream
    assert run(1)[0] != a[0]


def test_the_stream_depends_on_the_worker_count(shards, tok):
    """Why `num_workers` is part of the training run key (run_keys.DEFAULT_EXCLUDE leaves it in)."""
    def stream(workers):
        return keys_of(make_loader(shards, tok, batch_size=3, epoch_steps=4, num_workers=workers, shuffle_buffer=8))

    assert stream(0) == stream(1)  # the main process draws worker 0's stream
    assert stream(2) != stream(0)


def test_workers_with_fewer_shards_than_workers(shards, tok):
    loader = make_loader(shards[:1], tok, batch_size=2, epoch_steps=7, num_workers=2, shuffle_buffer=4)
    batches = list(loader)
    assert len(batches) == 7  # counted on the loader, not per worker
    assert all(b["image"].shape == (2, 3, SIZE, SIZE) for b in batches)
    assert {k for b in batches for k in b["key"]} <= {f"k{i:05d}" for i in range(3)}


def test_caption_dropout(shards, tok):
    loader = make_loader(shards, tok, batch_size=8, epoch_steps=40, caption_dropout=0.3, shuffle_buffer=1)
    dropped = total = 0
    for b in loader:
        null = null_tokens(tok, 1)[0, : b["tokens"].shape[1]]  # the batch's columns (trim_padding)
        for caption, tokens in zip(b["caption"], b["tokens"]):
            total += 1
            if caption == "":
                dropped += 1
                assert torch.equal(tokens, null)
            else:
                assert not torch.equal(tokens, null)
    assert 0.2 < dropped / total < 0.4  # 320 draws of p = 0.3: sd ~ 0.026


def test_iter_shards_reads_each_sample_once_in_order(shards, tok):
    samples = list(iter_shards(shards, tokenizer=tok))
    assert [s["key"] for s in samples] == [f"k{i:05d}" for i in range(24)]
    assert samples[5]["image"].shape == (3, SIZE, SIZE) and samples[5]["tokens"].shape == (12,)
    assert samples[5]["meta"] == {"i": 5} and samples[5]["caption"].endswith("number 5")



def test_iter_shards_decodes_on_threads_in_the_same_order(shards, tok, monkeypatch):
    """With workers, images whose decoding takes long enough go to threads (forced here: any call does), and
    the samples are the one-thread samples, in the same order; stopping early shuts the threads down."""
    from diffusion.data import ordered_pool, shard_reading

    where: list[str] = []
    decode = shard_reading.decode_image

    def recorded(data):
        where.append(threading.current_thread().name)
        return decode(data)

    monkeypatch.setattr(shard_reading, "decode_image", recorded)
    monkeypatch.setattr(ordered_pool, "MIN_SECONDS", 0.0)
    one = list(iter_shards(shards, tokenizer=tok))
    assert set(where) == {threading.current_thread().name}
    where.clear()
    threaded = list(iter_shards(shards, tokenizer=tok, workers=3))
    assert sum(name.startswith("decode") for name in where) == 24 - ordered_pool.PROBE  # after the probe
    assert [s["key"] for s in threaded] == [s["key"] for s in one]
    for a, b in zip(one, threaded):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["tokens"], b["tokens"])
        assert (a["caption"], a["meta"]) == (b["caption"], b["meta"])
    stream = iter_shards(shards, workers=3)
    first = [next(stream)["key"] for _ in range(ordered_pool.PROBE + 2)]
    assert first == [s["key"] for s in one[: ordered_pool.PROBE + 2]]
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("decode")]

def test_single_pass_mode_with_workers(shards, tok):
    loader = make_loader(shards, tok, batch_size=1, num_workers=2, resampled=False, shuffle_buffer=5)
    keys = keys_of(loader)
    assert sorted(keys) == [f"k{i:05d}" for i in range(24)]  # every sample once, split across workers


def test_single_pass_with_no_full_batch_is_an_error_not_a_short_epoch(shards, tok):
    """24 samples split over 2 workers, batch 15: each worker's share is under a batch and dropped. WebDataset
    would end the epoch silently at 0 of len() batches (a DDP hang when only one rank does); it must raise."""
    loader = make_loader(shards, tok, batch_size=15, num_workers=2, resampled=False, shuffle_buffer=0, epoch_steps=3)
    assert len(loader) == 3
    with pytest.raises(RuntimeError, match="no full batch of 15"):
        list(loader)
    fits = make_loader(shards, tok, batch_size=5, num_workers=2, resampled=False, shuffle_buffer=0, epoch_steps=7)
    assert len(list(fits)) == 7  # short passes repeat until epoch_steps


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from diffusion.data.loader import make_loader
    from diffusion.data.tokenizer import load_tokenizer

    rank, port, tok_path, shards = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    loader = make_loader(shards, load_tokenizer(tok_path), batch_size=3, epoch_steps=6, num_workers=2,
                         shuffle_buffer=4, seed=0)
    count, keys = 0, []
    for batch in loader:
        total = torch.ones(1)
        dist.all_reduce(total)  # a rank with fewer batches would leave the other waiting here
        assert total.item() == 2
        count += 1
        keys += batch["key"]
    dist.barrier()
    dist.destroy_process_group()
    print(json.dumps({"rank": rank, "count": count, "keys": keys}))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_ddp_two_ranks_equal_batches(shards, tok, tmp_path):
    tok_path = save_tokenizer(tok, tmp_path / "tokenizer.json")
    port = str(free_port())
    procs = [
        subprocess.Popen([sys.executable, "-c", DDP_SCRIPT, str(r), port, str(tok_path), *shards],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=100)
            assert p.returncode == 0, err[-2000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [r["count"] for r in results] == [6, 6]
    assert all(len(r["keys"]) == 18 for r in results)
    assert results[0]["keys"] != results[1]["keys"]  # each rank draws its own stream


def test_single_pass_under_ddp_needs_epoch_steps_on_every_rank(shards, tok, monkeypatch):
    """One pass over unequal shards (3, 5, 7, 9 samples) gives the ranks unequal batch counts, and DDP hangs
    when one runs out (Lightning's own DDP set-up came after the old build-time check, so rank 0 missed it)."""
    loader = make_loader(shards, tok, batch_size=1, resampled=False, shuffle_buffer=0)  # built before DDP starts
    for rank in ("0", "1"):
        monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("RANK", rank)
        with pytest.raises(ValueError, match="needs epoch_steps"):
            next(iter(loader))
        with pytest.raises(ValueError, match="1 shards for 2 ranks"):
            next(iter(make_loader(shards[:1], tok, batch_size=1, resampled=False, epoch_steps=2)))
        equal = make_loader(shards, tok, batch_size=2, resampled=False, shuffle_buffer=0, epoch_steps=5)
        assert len(list(equal)) == 5


def test_map_style_datasets():
    """The seed's map-style API: dummy dataset and ListDataset give (3,S,S) in [-1,1] and (T,) long."""
    from diffusion.data import ListDataset, create_dummy_dataset

    ds = create_dummy_dataset(num_samples=12, image_size=16, seed=3)
    image, tokens = ds[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert -1.0 <= image.min() < image.max() <= 1.0
    assert tokens.shape == (16,) and tokens.dtype == torch.long and tokens[0] == 2
    again = create_dummy_dataset(num_samples=12, image_size=16, seed=3, tokenizer=ds.tokenizer)
    assert torch.equal(again[5][0], ds[5][0]) and again.captions == ds.captions
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    lst = ListDataset([wide, torch.zeros(3, 32, 32)], ["a red square", "grey"], ds.tokenizer, image_size=8)
    assert lst[0][0].shape == lst[1][0].shape == (3, 8, 8)
    assert torch.allclose(lst[0][0][0], torch.ones(8, 8)) and torch.allclose(lst[0][0][1], -torch.ones(8, 8))
    assert len(torch.utils.data.DataLoader(lst, batch_size=2).__iter__().__next__()) == 2


def test_short_passes_read_every_position_of_a_shard_equally_often(tmp_path):
    """A training pass is one checkpoint interval (training.exact_resume), usually cut inside a shard. Started at
    each shard's first sample, short passes drew a shard's first quarter 1.4x as often as the mean and its last
    0.2x; a pass starts at a uniform position of its first shard instead."""
    import collections

    from PIL import Image

    from diffusion.data.records import Sample
    from diffusion.data.shards import write_shards
    from diffusion.data.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    samples = [Sample(f"k{i:05d}", Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)), f"c {i}", {})
               for i in range(400)]
    urls = [str(p) for p in write_shards(samples, tmp_path / "train", samples_per_shard=100)]
    tok = train_tokenizer([s.caption for s in samples], 64, 8)
    loader = make_loader(urls, tok, batch_size=8, shuffle_buffer=50, epoch_steps=5, seed=0)  # 40 samples a pass
    quarters = collections.Counter((int(k[1:]) % 100) // 25 for _ in range(200) for b in loader for k in b["key"])
    share = [quarters[q] / sum(quarters.values()) * 4 for q in range(4)]
    assert all(0.85 < s < 1.15 for s in share), share


def test_a_damaged_shard_is_named(shards, tok, tmp_path):
    """A shard cut short stopped the stages with tarfile's "unexpected end of data", naming no file (the
    resampled loader's header count, the stream, the ordered reader alike)."""
    import shutil

    from diffusion.data.shard_reading import DamagedShardError

    cut = tmp_path / "cut.tar"
    shutil.copyfile(shards[3], cut)
    with open(cut, "r+b") as fh:
        fh.truncate(3000)  # inside a member's data (cut at a header, tarfile's stream just ends: see below)
    with pytest.raises(DamagedShardError, match=rf"{cut}: damaged shard"):
        list(iter_shards([shards[0], str(cut)]))
    with pytest.raises(DamagedShardError, match=rf"{cut}: damaged shard"):
        keys_of(make_loader([str(cut)], tok, batch_size=2, epoch_steps=4, shuffle_buffer=1))
    with pytest.raises(DamagedShardError, match=rf"{cut}: damaged shard"):
        keys_of(make_loader([str(cut)], tok, batch_size=2, epoch_steps=4, shuffle_buffer=1, resampled=False))


def test_a_stage_refuses_a_split_its_manifest_or_tar_itself_says_is_incomplete(tmp_path):
    """require_split, before a stage works: a shard missing from the folder, or one its manifest does not list,
    passed silently (a smaller dataset trained); so did a shard cut at a member boundary, which tarfile's stream
    reader takes for a shorter archive."""
    import shutil

    from diffusion.atomic import atomic_write_json
    from diffusion.data.locations import require_split

    root = tmp_path / "shards"
    paths = write_shards(make_samples(12), root / "train", samples_per_shard=4)
    atomic_write_json(root / "manifest.json", {"shards": {"train": [p.name for p in paths]}})
    assert require_split(str(root), "train", "train.shards_dir", "shard", RuntimeError) == [str(p) for p in paths]
    spare = tmp_path / "spare.tar"
    shutil.move(paths[1], spare)
    with pytest.raises(RuntimeError, match=r"train.shards_dir: .* manifest.json lists \(missing: shard-000001.tar; "
                                           r"not listed: none\); rerun `python cli.py shard`"):
        require_split(str(root), "train", "train.shards_dir", "shard", RuntimeError)
    shutil.copyfile(spare, paths[1])
    shutil.copyfile(spare, root / "train/extra.tar")
    with pytest.raises(RuntimeError, match=r"missing: none; not listed: extra.tar"):
        require_split(str(root), "train", "train.shards_dir", "shard", RuntimeError)
    (root / "train/extra.tar").unlink()
    with open(paths[2], "r+b") as fh:  # at a 512-byte block boundary: the stream reader sees a shorter archive
        fh.truncate(2048)
    assert len(list(iter_shards([str(paths[2])]))) < 4
    with pytest.raises(RuntimeError, match=rf"{paths[2]}: damaged shard \(cut short"):
        require_split(str(root), "train", "train.shards_dir", "shard", RuntimeError)


def test_single_pass_gives_each_shard_to_one_rank(tmp_path, monkeypatch, tok):
    """resampled=False reads each shard once per pass, on one rank: dropping the split read every shard on
    every rank (twice the data, the same batches on both) and no test noticed."""
    shards = [str(p) for p in write_shards(make_samples(24), tmp_path / "s", samples_per_shard=3)]  # 8 shards
    keys = []
    for rank in (0, 1):  # dist_info reads RANK and WORLD_SIZE when torch.distributed is not initialised
        monkeypatch.setenv("RANK", str(rank)), monkeypatch.setenv("WORLD_SIZE", "2")
        keys.append(keys_of(make_loader(shards, tok, batch_size=1, resampled=False, shuffle_buffer=0,
                                        epoch_steps=12)))  # 4 shards of 3 per rank: one pass
    assert not set(keys[0]) & set(keys[1]), "a shard was read by both ranks"
    assert sorted(keys[0] + keys[1]) == sorted(s.key for s in make_samples(24))
