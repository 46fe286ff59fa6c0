"""Shard folders read through URLs (diffusion.data.locations): a local folder, the same folder served over
HTTP (fetched with curl, as from object storage), and a `pipe:` command; and the errors for what cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import serve_folder
from PIL import Image

from diffusion.data.loader import make_loader
from diffusion.data.locations import is_remote, list_split, read_manifest, resolve, split_shards
from diffusion.data.records import Sample
from diffusion.data.shard_reading import iter_shards
from diffusion.data.shards import write_shards
from diffusion.data.tokenizer import train_tokenizer


def _samples(n: int, start: int) -> list[Sample]:
    return [Sample(f"k{i:04d}", Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)), f"square {i}", {"i": i})
            for i in range(start, start + n)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A shard folder as the shard stage leaves it: train (3 shards of 4), val (1 shard of 3), manifest.json."""
    root = tmp_path_factory.mktemp("location") / "shards"
    train = write_shards(_samples(12, 0), root / "train", samples_per_shard=4)
    val = write_shards(_samples(3, 100), root / "val", samples_per_shard=4)
    manifest = {"counts": {"train": 12, "val": 3}, "resolution": 8,
                "shards": {"train": [Path(p).name for p in train], "val": [Path(p).name for p in val]}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _keys(urls: list[str]) -> list[str]:
    return [s["key"] for s in iter_shards(urls)]


def test_a_folder_served_over_http_or_read_by_a_pipe_gives_the_same_shards(folder):
    local = list_split(str(folder), "train")
    assert [Path(p).name for p in local] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    expected = _keys(local)
    assert expected == [f"k{i:04d}" for i in range(12)]

    pipe = f"pipe:cat {folder}/{{}}"
    assert list_split(pipe, "val") == [f"pipe:cat {folder}/val/shard-000000.tar"]
    assert split_shards(pipe, "train")[0] == ("shard-000000.tar", f"pipe:cat {folder}/train/shard-000000.tar")
    assert _keys(list_split(pipe, "train")) == expected
    assert read_manifest(pipe)["counts"] == {"train": 12, "val": 3}

    with serve_folder(folder.parent) as base:
        url = f"{base}/shards/"  # a trailing slash is fine
        assert is_remote(url) and resolve(url, "manifest.json") == f"{base}/shards/manifest.json"
        http = list_split(url, "train")
        assert http[0] == f"{base}/shards/train/shard-000000.tar"
        assert _keys(http) == expected
        assert read_manifest(url)["resolution"] == 8
        # The training loader streams the URLs like local files (workers fetch with curl).
        tok = train_tokenizer([f"square {i}" for i in range(12)], vocab_size=40, max_length=6)
        batches = list(make_loader(http, tok, batch_size=4, epoch_steps=3, shuffle_buffer=0, num_workers=1))
        assert len(batches) == 3 and all(b["image"].shape == (4, 3, 8, 8) for b in batches)
        assert {k for b in batches for k in b["key"]} <= set(expected)
        # No manifest at the URL: the error says what could not be read, and why in words (not curl's arguments).
        with pytest.raises(FileNotFoundError, match=r"/missing/manifest.json: cannot read the manifest that lists the "
                                                    r"shards \(curl exited 22: the server answered with an HTTP error"):
            list_split(f"{base}/missing", "train")
        assert read_manifest(f"{base}/missing") is None
    with pytest.raises(FileNotFoundError, match=r"\(curl exited 7: nothing answers at that host and port\)$"):
        list_split(f"{base}/shards", "train")  # the server has stopped
    with pytest.raises(FileNotFoundError, match=r"\(the command exited 1\)$"):
        list_split("pipe:false {}", "train")


def test_urls_webdataset_cannot_open_are_refused_with_what_to_write_instead(folder):
    with pytest.raises(FileNotFoundError, match=r"pipe:aws s3 cp s3://bucket/latents/\{\} -"):
        list_split("s3://bucket/latents", "train")
    with pytest.raises(FileNotFoundError, match=r"needs \{\}"):
        list_split(f"pipe:cat {folder}/train/shard-000000.tar", "train")
    with pytest.raises(FileNotFoundError, match="no shards listed for split 'test'"):
        list_split(f"pipe:cat {folder}/{{}}", "test")


def test_require_split_names_the_key_the_folder_and_the_stage_to_run(tmp_path, folder):
    from diffusion.data.locations import require_split

    class StageError(RuntimeError):
        pass

    assert require_split(str(folder), "train", "x.shards_dir", "shard", StageError) == list_split(str(folder), "train")
    (tmp_path / "empty/val").mkdir(parents=True)
    location = tmp_path / "missing"  # no split folder
    with pytest.raises(StageError, match=rf"^x.latents_dir: no latent shards in {location}/val; run `python cli.py "
                                         r"encode-latents` \(or `dvc repro encode_latents`\) first$"):
        require_split(str(location), "val", "x.latents_dir", "encode_latents", StageError, "latent shards")
    # A split folder without shards: the stage that wrote it ran, so the message points at the empty split's cause.
    with pytest.raises(StageError, match=rf"^x.latents_dir: {tmp_path / 'empty'}/val exists but holds no latent "
                                         r"shards.*shard.val_fraction"):
        require_split(str(tmp_path / "empty"), "val", "x.latents_dir", "encode_latents", StageError, "latent shards")
    # allow_empty (encode_latents' val split, empty with shard.val_fraction 0): an empty split is [], a missing one
    # is still an error.
    assert require_split(str(tmp_path / "empty"), "val", "k", "shard", StageError, allow_empty=True) == []
    with pytest.raises(StageError, match="no shards in"):
        require_split(str(tmp_path / "missing"), "val", "k", "shard", StageError, allow_empty=True)


def test_stages_refuse_a_bad_url_before_any_work(tmp_path):
    from diffusion.data_configs import EncodeLatentsConfig
    from diffusion.eval_configs import EvaluateConfig, JudgeConfig
    from diffusion.stage_configs import TrainConfig
    from pipeline import encode_latents, evaluate, train, train_judge

    with pytest.raises(train.TrainError, match=r"train.latents_dir: .*pipe:aws s3 cp s3://b/latents/\{\} -"):
        train.validate(TrainConfig(latents_dir="s3://b/latents"))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae/config.json").write_text("{}")
    torch.save({}, tmp_path / "vae/model.pt")  # a whole file (a cut one is named before the shards are looked at)
    with pytest.raises(encode_latents.EncodeLatentsError, match="encode_latents.shards_dir: .*manifest"):
        encode_latents.validate(EncodeLatentsConfig(shards_dir=f"pipe:cat {tmp_path}/nothing/{{}}",
                                                    vae_dir=str(tmp_path / "vae")))
    model, judge = tmp_path / "model", tmp_path / "judge"  # evaluate's other inputs, present (empty files)
    for folder, names in ((model, ("config.json", "model.pt", "tokenizer.json", "train_config.json")),
                          (judge, ("config.json",))):
        folder.mkdir()
        for name in names:
            (folder / name).write_text("{}")
    (model / "train_config.json").write_text('{"scheduler": {"num_timesteps": 1000}}')
    with pytest.raises(evaluate.EvaluateError, match="evaluate.shards_dir: .*manifest"):
        evaluate.validate(EvaluateConfig(shards_dir=f"pipe:cat {tmp_path}/nothing/{{}}", model_dir=str(model),
                                         judge_dir=str(judge)))
    with pytest.raises(train_judge.TrainJudgeError, match="train_judge.shards_dir: .*manifest"):
        train_judge.main(JudgeConfig(shards_dir=f"pipe:cat {tmp_path}/nothing/{{}}"))


def test_run_keys_count_remote_shards_by_url_without_fetching_them():
    from diffusion.run_keys import files_fingerprint

    a = files_fingerprint(["https://h/d/train/shard-000000.tar", "pipe:cat /nowhere/shard-000001.tar"])
    assert a == files_fingerprint(["pipe:cat /nowhere/shard-000001.tar", "https://h/d/train/shard-000000.tar"])
    assert a != files_fingerprint(["https://h/d2/train/shard-000000.tar", "pipe:cat /nowhere/shard-000001.tar"])


def test_a_damaged_vae_is_named_before_any_work(tmp_path):
    """A VAE weights file cut short failed inside torch.load ("failed finding central directory"), naming no
    file, with the run open; encode_latents and train now name it in their checks."""
    from diffusion.data_configs import EncodeLatentsConfig
    from diffusion.stage_configs import TrainConfig
    from pipeline import encode_latents, train

    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(1000)}, vae / "model.pt")
    with open(vae / "model.pt", "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(encode_latents.EncodeLatentsError, match=rf"encode_latents.vae_dir: {vae}/model.pt: damaged"):
        encode_latents.validate(EncodeLatentsConfig(shards_dir=str(tmp_path / "shards"), vae_dir=str(vae),
                                                    out_dir=str(tmp_path / "latents")))
    latents = tmp_path / "latents/train"
    write_shards([Sample("k0", Image.new("RGB", (8, 8)), "c", {})], latents, samples_per_shard=1)
    (tmp_path / "tok.json").write_text("{}")
    with pytest.raises(train.TrainError, match=rf"train.vae_dir: {vae}/model.pt: damaged"):
        train.validate(TrainConfig(latents_dir=str(tmp_path / "latents"), vae_dir=str(vae),
                                   tokenizer_path=str(tmp_path / "tok.json"), out_dir=str(tmp_path / "out")))
