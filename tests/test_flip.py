"""Random horizontal flips with cached latents (`encode_latents.flip`, `train.random_flip`, `train.flip_swaps`).

The encode stage stores each train image's mirrored posterior beside its own (the unmirrored bytes as without
flip); the loader takes it for half the samples, seeded, mirroring their captions' words; the train stage trains
with it, and refuses it before any work when the latents hold no mirrored images.
"""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from test_train_stage import copy_project, train_in_process, trains_otherwise, upstream  # noqa: F401 (a fixture)

from diffusion.config import ConfigError
from diffusion.data.latents import (
    LOGVAR_FLIP_EXT,
    MEAN_FLIP_EXT,
    LatentRecord,
    make_latent_loader,
    mirror_caption,
    write_latent_shards,
)
from diffusion.data.tokenizer import train_tokenizer

QUICK = ("train.max_steps=2", "train.warmup_steps=0", "train.sample_every_n_steps=0", "train.val_batches=0")


def _members(folder) -> dict[str, bytes]:
    """Every member of the latent shards in `folder`, by shard and name."""
    out = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            out.update({f"{path.name}/{m.name}": tar.extractfile(m).read() for m in tar if m.isfile()})
    return out


def _encode(root, *overrides: str) -> None:
    from diffusion.data_configs import EncodeLatentsConfig
    from diffusion.params import load_section
    from pipeline import encode_latents

    cwd = os.getcwd()
    os.chdir(root)
    try:
        encode_latents.main(load_section(EncodeLatentsConfig, root / "params.yaml", list(overrides)))
    finally:
        os.chdir(cwd)


def test_mirror_caption_swaps_whole_words_both_ways():
    swaps = (("left", "right"),)
    assert mirror_caption("a red circle in the top left", swaps) == "a red circle in the top right"
    assert mirror_caption("Left of a star, right of a square", swaps) == "Right of a star, left of a square"
    assert mirror_caption("leftover bright lights", swaps) == "leftover bright lights"  # whole words only
    assert mirror_caption("top left", ()) == "top left"


@pytest.fixture(scope="module")
def flipped(upstream, tmp_path_factory):  # noqa: F811
    """The tiny project's latents encoded again with encode_latents.flip."""
    root = copy_project(upstream, tmp_path_factory.mktemp("flipped"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'flip.db'}")
        _encode(root, "encode_latents.flip=true")
    return root


def test_encode_stores_the_mirrored_posterior_beside_the_same_bytes(upstream, flipped):  # noqa: F811
    from diffusion.data.shard_reading import iter_shards
    from diffusion.data.shards import list_shards
    from diffusion.training.latent_stats import load_vae

    manifest = json.loads((flipped / "data/latents/manifest.json").read_text())
    assert manifest["flip"] is True and manifest["flip_members"] == [MEAN_FLIP_EXT, LOGVAR_FLIP_EXT]
    assert "flip" not in json.loads((upstream / "data/latents/manifest.json").read_text())
    for split in ("train", "val"):
        before, after = _members(upstream / "data/latents" / split), _members(flipped / "data/latents" / split)
        added = {k: v for k, v in after.items() if k not in before}
        assert all(after[k] == v for k, v in before.items())  # the unmirrored members: the same bytes
        assert bool(added) == (split == "train")  # the val split as it is
    added = {k: v for k, v in _members(flipped / "data/latents/train").items() if k.endswith(MEAN_FLIP_EXT)}
    assert len(added) == manifest["counts"]["train"]
    vae = load_vae(flipped / "models/vae")[0].eval()
    images = list(iter_shards(list_shards(flipped / "data/shards/train")))[:4]
    with torch.no_grad():
        mirrored = vae.encode(torch.stack([x["image"] for x in images]).flip(-1)).mean  # (4, C, h, w)
        plain = vae.encode(torch.stack([x["image"] for x in images])).mean
    stored = torch.stack([torch.from_numpy(np.load(io.BytesIO(v))).float() for v in list(added.values())[:4]])
    torch.testing.assert_close(stored, mirrored, rtol=2e-3, atol=1e-3)  # float16's 11 bits
    assert not torch.allclose(stored, plain, rtol=2e-3, atol=1e-3)  # not the unmirrored image's


def test_the_loader_takes_half_the_mirrored_posteriors_and_mirrors_their_captions(tmp_path):
    zero, one = np.zeros((1, 1, 1), np.float16), np.ones((1, 1, 1), np.float16)
    low = np.full((1, 1, 1), -30, np.float16)  # std e^-15: the draw is the mean
    records = [LatentRecord(f"k{i:04d}", zero, low, f"a square in the top left {i}", {}, one, low) for i in range(90)]
    plain = [LatentRecord(f"p{i:04d}", zero, low, f"a circle on the left {i}", {}) for i in range(10)]
    urls = [str(p) for p in write_latent_shards([("a.tar", records[:50]), ("b.tar", records[50:] + plain)], tmp_path)]
    tok = train_tokenizer([r.caption for r in records + plain] + ["right"], vocab_size=64, max_length=12)
    kw = {"batch_size": 50, "latent_scale": 1.0, "latent_shift": 0.0, "shuffle_buffer": 20, "epoch_steps": 40,
          "seed": 0, "caption_dropout": 0.0}

    def draws(**flip):
        batches = list(make_latent_loader(urls, tok, **kw, **flip))
        return [(k, c, z.item()) for b in batches for k, c, z in zip(b["key"], b["caption"], b["latents"].flatten())]

    seen = draws(random_flip=True, flip_swaps=(("left", "right"),))
    took = [z > 0.5 for _, _, z in seen]
    assert all(("right" in c) == t and ("left" in c) != t for (_, c, _), t in zip(seen, took))
    share = sum(t for (k, _, _), t in zip(seen, took) if k.startswith("k")) / sum(k.startswith("k") for k, _, _ in seen)
    assert 0.45 < share < 0.55, share  # ~1800 draws: binomial sd ~0.012
    assert not any(t for (k, _, _), t in zip(seen, took) if k.startswith("p"))  # no mirrored posterior: as it is
    assert seen == draws(random_flip=True, flip_swaps=(("left", "right"),)), "seeded"
    assert not any(z > 0.5 for _, _, z in draws())  # off by default, where the shards hold them too


def test_the_stage_trains_on_mirrored_latents_and_logs_it(flipped, tmp_path):
    params = trains_otherwise(copy_project(flipped, tmp_path), QUICK, "train.random_flip=true",
                              "train.flip_swaps=[[left, right]]")
    assert (params["random_flip"], params["flip_swaps"]) == ("True", "[['left', 'right']]")


def test_random_flip_without_mirrored_latents_stops_before_any_work(upstream, tmp_path):  # noqa: F811
    from pipeline.train import TrainError

    root = copy_project(upstream, tmp_path)
    with pytest.raises(TrainError, match=r"train.random_flip: the latents in data/latents hold no mirrored images; "
                                         r"encode them with encode_latents.flip: true"):
        train_in_process(root, *QUICK, "train.random_flip=true")
    assert not (root / "checkpoints/train").exists() and not (root / "models/diffusion").exists()


@pytest.mark.parametrize("swaps", ["[[left, left]]", "[[left, right], [right, up]]", "[[left, '']]"])
def test_flip_swaps_that_are_not_pairs_of_words_are_refused(upstream, tmp_path, swaps):  # noqa: F811
    root = copy_project(upstream, tmp_path)
    with pytest.raises(ConfigError, match=r"flip_swaps: expected pairs of two different words"):
        train_in_process(root, *QUICK, f"train.flip_swaps={swaps}")
