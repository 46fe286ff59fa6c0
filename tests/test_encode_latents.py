"""Stage `encode_latents` and the latent shard loader: tiny VAE, tiny shards, the real CLI.

The module fixture writes 10 train and 3 val images (16 px) into shards of 4, saves a random tiny VAE as
the train_vae stage would (known scale 2 and shift 0.5), and runs `python cli.py encode-latents` once.
"""

from __future__ import annotations

import hashlib
import shutil
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT, run_cli
from diffusion.params import load_section
from diffusion.data.latents import (
    LatentRecord, iter_latents, make_latent_loader, npy_bytes, read_npy, write_latent_shards,
)
from diffusion.data.records import Sample
from diffusion.data.shard_reading import iter_shards
from diffusion.data.shards import list_shards, write_shards
from diffusion.data.tokenizer import encode, null_tokens, train_tokenizer
from diffusion.models.vae import AutoencoderKL, VAEConfig
from diffusion.data_configs import EncodeLatentsConfig
from diffusion.training.latent_stats import LatentStats, load_vae, save_vae

SCALE, SHIFT = 2.0, 0.3  # SHIFT not 1 / SCALE: a shift confused with the std must show
COLOURS = ("red", "green", "blue", "yellow")
TINY_VAE = VAEConfig(latent_dim=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                     mid_attention=False)


def _samples(split: str, n: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [
        Sample(f"{split}-{i:04d}", Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)),
               f"a {COLOURS[i % 4]} square {i}", {"attributes": {"color": COLOURS[i % 4]}, "index": i})
        for i in range(n)
    ]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A working folder with shards, a VAE artifact and params.yaml, after one CLI run of the stage."""
    root = tmp_path_factory.mktemp("encode")
    write_shards(_samples("train", 10, 0), root / "data/shards/train", samples_per_shard=4)
    write_shards(_samples("val", 3, 1), root / "data/shards/val", samples_per_shard=4)
    torch.manual_seed(0)
    save_vae(AutoencoderKL(TINY_VAE), LatentStats(mean=SHIFT, std=1 / SCALE, num_values=1, num_batches=1),
             root / "models/vae")
    # batch 3 does not divide the shards' 4: batches must not cross or drop samples.
    params = {"encode_latents": {"batch_size": 3}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = run_cli(["encode-latents"], root, env)
    return {"root": root, "env": env, "proc": proc, "hashes": _hashes(root / "data/latents")}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([s.caption for s in _samples("train", 10, 0)], vocab_size=64, max_length=8)


def test_stage_writes_latent_shards_like_the_image_shards(project):
    root, out = project["root"], project["root"] / "data/latents"
    names = lambda d: [Path(p).name for p in list_shards(d)]  # noqa: E731
    assert names(out / "train") == names(root / "data/shards/train") == [f"shard-00000{i}.tar" for i in range(3)]
    assert names(out / "val") == ["shard-000000.tar"]
    manifest = yaml.safe_load((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 10, "val": 3}
    assert list(manifest["shards"]["train"].values()) == [4, 4, 2]
    assert manifest["latent_shape"] == [3, 8, 8]
    assert manifest["vae"]["latent_scale"] == SCALE
    assert "data/latents" in project["proc"].stdout and "MLflow run" in project["proc"].stdout
    with tarfile.open(out / "train/shard-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:4]] == [f"train-0000.{e}" for e in ("mean.npy", "logvar.npy", "txt", "json")]
    assert {m.mtime for m in members} == {0}
    assert not list(root.glob("data/.latents*")), "temporary folder left behind"


def test_mlflow_run_has_params_and_counts(project):
    import mlflow

    client = mlflow.MlflowClient(project["env"]["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    run = next(r for r in runs if r.data.tags.get("stage") == "encode_latents")
    assert run.data.metrics["train_samples"] == 10 and run.data.metrics["val_samples"] == 3
    assert run.data.metrics["samples_per_s"] > 0
    assert run.data.params["batch_size"] == "3"


def test_rerun_is_byte_identical(project):
    """Also when the VAE's folder is typed another way: the manifest records the path normalised."""
    vae = project["root"] / "models/vae"
    run_cli(["encode-latents", "-S", f"encode_latents.vae_dir={vae}/"], project["root"], project["env"])
    assert _hashes(project["root"] / "data/latents") == project["hashes"]
    manifest = json.loads((project["root"] / "data/latents/manifest.json").read_text())
    assert manifest["vae"]["dir"] == "models/vae"


def test_posterior_is_the_vaes_encoding(project):
    root = project["root"]
    vae, scale, shift = load_vae(root / "models/vae")
    assert (scale, shift) == (SCALE, SHIFT)
    for split in ("train", "val"):
        images = list(iter_shards(list_shards(root / "data/shards" / split)))
        latents = list(iter_latents(list_shards(root / "data/latents" / split)))
        assert [x["key"] for x in latents] == [x["key"] for x in images]
        assert [x["caption"] for x in latents] == [x["caption"] for x in images]
        assert [x["meta"] for x in latents] == [x["meta"] for x in images]
        with torch.no_grad():
            posterior = vae.encode(torch.stack([x["image"] for x in images]))
        mean, logvar = torch.stack([x["mean"] for x in latents]), torch.stack([x["logvar"] for x in latents])
        # float16 keeps 11 significant bits: relative error <= 2**-11, plus float32 batch-size noise.
        torch.testing.assert_close(mean, posterior.mean, rtol=2e-3, atol=1e-3)
        torch.testing.assert_close(logvar, posterior.logvar, rtol=2e-3, atol=1e-3)


def _by_key(loader) -> dict[str, torch.Tensor]:
    return {k: b["latents"][i] for b in loader for i, k in enumerate(b["key"])}


def test_loader_draws_new_latents_each_epoch_and_is_seeded(project, tok):
    urls = list_shards(project["root"] / "data/latents/train")
    kw = dict(batch_size=2, latent_scale=SCALE, latent_shift=SHIFT, shuffle_buffer=4, caption_dropout=0.0,
              resampled=False)
    loader = make_latent_loader(urls, tok, seed=3, **kw)
    first, second = _by_key(loader), _by_key(loader)  # two passes = two epochs
    assert first.keys() == second.keys() and len(first) == 10
    # Randomness not frozen: the same image gets a new draw from its posterior every epoch.
    assert all(not torch.equal(first[k], second[k]) for k in first)
    again = _by_key(make_latent_loader(urls, tok, seed=3, **kw))
    assert all(torch.equal(first[k], again[k]) for k in first), "same seed, same first epoch"
    other = _by_key(make_latent_loader(urls, tok, seed=4, **kw))
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_loader_applies_scale_and_shift(project, tok):
    """Recover eps = (latents / scale + shift - mean) / std: standard normal only if scale/shift are right."""
    urls = list_shards(project["root"] / "data/latents/train")
    stored = {x["key"]: x for x in iter_latents(urls)}
    loader = make_latent_loader(urls, tok, batch_size=5, latent_scale=SCALE, latent_shift=SHIFT,
                                shuffle_buffer=0, caption_dropout=0.0, resampled=False)
    eps = torch.stack([
        (z / SCALE + SHIFT - stored[k]["mean"]) / torch.exp(0.5 * stored[k]["logvar"])
        for k, z in _by_key(loader).items()
    ])
    assert abs(eps.mean().item()) < 0.1 and abs(eps.std().item() - 1.0) < 0.1


def test_loader_scale_shift_exact_with_a_point_posterior(tmp_path, tok):
    """logvar -30 makes std ~3e-7, so latents must equal (mean - shift) * scale, per channel too."""
    mean = np.arange(12, dtype=np.float16).reshape(3, 2, 2)
    point = np.full((3, 2, 2), -30, np.float16)
    records = [LatentRecord(f"k{i}", mean + i, point, "a red square", {}) for i in range(4)]
    urls = [str(p) for p in write_latent_shards([("s.tar", records)], tmp_path)]
    scale, shift = (1.0, 2.0, 3.0), (0.0, 1.0, -1.0)
    loader = make_latent_loader(urls, tok, batch_size=4, latent_scale=scale, latent_shift=shift,
                                shuffle_buffer=0, caption_dropout=0.0, resampled=False)
    got = _by_key(loader)
    for i in range(4):
        per_channel = lambda v: torch.tensor(v)[:, None, None]  # noqa: E731  (C,) -> (C, 1, 1)
        expected = (torch.from_numpy(mean + i).float() - per_channel(shift)) * per_channel(scale)
        torch.testing.assert_close(got[f"k{i}"], expected, rtol=0, atol=1e-5)


def test_caption_dropout_rate_and_null_tokens(tmp_path, tok):
    tiny = np.zeros((1, 1, 1), np.float16)
    records = [LatentRecord(f"k{i:04d}", tiny, tiny, f"a red square {i}", {}) for i in range(200)]
    urls = [str(p) for p in write_latent_shards([("a.tar", records[:100]), ("b.tar", records[100:])], tmp_path)]
    kw = dict(batch_size=50, latent_scale=1.0, latent_shift=0.0, shuffle_buffer=10, epoch_steps=40, seed=0)
    batches = list(make_latent_loader(urls, tok, caption_dropout=0.25, **kw))
    captions = [c for b in batches for c in b["caption"]]
    rate = captions.count("") / len(captions)
    assert len(captions) == 2000 and 0.2 < rate < 0.3, rate  # binomial sd ~0.01
    # Batches are trimmed to their longest caption (trim_padding): pad them back to max_length to compare.
    width = null_tokens(tok, 1).shape[1]
    tokens = torch.cat([torch.nn.functional.pad(b["tokens"], (0, width - b["tokens"].shape[1])) for b in batches])
    dropped = torch.tensor([c == "" for c in captions])
    assert torch.equal(tokens[dropped], null_tokens(tok, int(dropped.sum())))
    assert torch.equal(tokens[~dropped], encode(tok, [c for c in captions if c]))
    again = [c for b in make_latent_loader(urls, tok, caption_dropout=0.25, **kw) for c in b["caption"]]
    assert again == captions, "dropout is seeded"
    none = [c for b in make_latent_loader(urls, tok, caption_dropout=0.0, **kw) for c in b["caption"]]
    assert "" not in none


def test_replay_mixes_that_share_of_samples_from_the_other_shards(tmp_path, tok):
    """train.replay: each sample comes from the replayed shards with probability `replay_fraction` (of 2000, within
    the binomial's spread), mixed into the same batches, seeded; without replay the stream is what it was."""
    tiny = np.zeros((1, 1, 1), np.float16)
    new = [LatentRecord(f"new{i:04d}", tiny, tiny, f"a red square {i}", {}) for i in range(100)]
    old = [LatentRecord(f"old{i:04d}", tiny, tiny, f"a blue circle {i}", {}) for i in range(300)]
    urls = [str(p) for p in write_latent_shards([("a.tar", new)], tmp_path / "new")]
    replay = [str(p) for p in write_latent_shards([("b.tar", old[:150]), ("c.tar", old[150:])], tmp_path / "old")]
    kw = {"batch_size": 50, "latent_scale": 1.0, "latent_shift": 0.0, "shuffle_buffer": 20, "epoch_steps": 40,
          "seed": 0, "caption_dropout": 0.0}
    keys = [[k for k in b["key"]] for b in make_latent_loader(urls, tok, replay_urls=replay, replay_fraction=0.3, **kw)]
    share = sum(k.startswith("old") for b in keys for k in b) / 2000
    assert 0.27 < share < 0.33, share  # binomial sd ~0.01
    assert sum(any(k.startswith("old") for k in b) and any(k.startswith("new") for k in b) for b in keys) >= 35
    assert keys == [list(b["key"]) for b in make_latent_loader(urls, tok, replay_urls=replay, replay_fraction=0.3,
                                                               **kw)], "seeded"
    plain = [list(b["key"]) for b in make_latent_loader(urls, tok, **kw)]
    assert all(k.startswith("new") for b in plain for k in b)
    with pytest.raises(ValueError, match=r"replay_fraction: expected a share in \[0, 1\) with replay_urls"):
        make_latent_loader(urls, tok, replay_fraction=0.3, **kw)


def test_rechunked_shards_and_missing_inputs(project, tmp_path, monkeypatch):
    from pipeline import encode_latents as stage

    root = project["root"]
    monkeypatch.chdir(root)
    cfg = EncodeLatentsConfig(out_dir=str(tmp_path / "lat"), samples_per_shard=6, batch_size=4)
    result = stage.run(cfg)
    assert result["shards"]["train"] == {"latents-000000.tar": 6, "latents-000001.tar": 4}
    keys = [x["key"] for x in iter_latents(list_shards(tmp_path / "lat/train"))]
    assert keys == [f"train-{i:04d}" for i in range(10)]
    with pytest.raises(stage.EncodeLatentsError, match=r"python cli.py shard"):
        stage.validate(cfg.replace(shards_dir=str(tmp_path / "nothing")))


def test_empty_val_split_is_encoded_to_an_empty_split_when_rechunking(project, tmp_path, monkeypatch):
    """A user source with shard.val_fraction 0 has an empty val split; re-chunked encoding must write an
    empty latent val split, not fail after encoding the whole train split."""
    from pipeline import encode_latents as stage

    monkeypatch.chdir(project["root"])
    shards = tmp_path / "shards"
    shutil.copytree(project["root"] / "data/shards/train", shards / "train")
    (shards / "val").mkdir()
    result = stage.run(EncodeLatentsConfig(shards_dir=str(shards), out_dir=str(tmp_path / "lat"), samples_per_shard=6))
    assert result["counts"] == {"train": 10, "val": 0}
    assert list((tmp_path / "lat/val").iterdir()) == []


def test_missing_vae_names_the_stage_to_run(project, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"encode_latents": {"vae_dir": "no/vae"}}))
    proc = run_cli(["encode-latents"], tmp_path, project["env"], check=False)
    assert proc.returncode == 1
    assert "no/vae" in proc.stderr and "python cli.py train-vae" in proc.stderr
    assert not (tmp_path / "data/latents").exists()


def test_npy_bytes_are_fixed_and_round_trip():
    a = np.random.default_rng(0).standard_normal((4, 3, 3)).astype(np.float16)
    assert npy_bytes(a) == npy_bytes(a.copy()) and npy_bytes(np.asfortranarray(a)) == npy_bytes(a)
    back = read_npy(npy_bytes(a))
    assert back.dtype == np.float16 and np.array_equal(back, a) and back.flags.writeable
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        read_npy(pickled.getvalue())


def test_params_yaml_section_parses():
    cfg = load_section(EncodeLatentsConfig, ROOT / "params.yaml")
    assert cfg.out_dir == "data/latents" and cfg.vae_dir == "models/vae"


def test_loader_with_workers_gives_exactly_epoch_steps_full_batches(project, tok):
    urls = list_shards(project["root"] / "data/latents/train")
    loader = make_latent_loader(urls, tok, batch_size=3, latent_scale=SCALE, latent_shift=SHIFT, num_workers=2,
                                epoch_steps=5, shuffle_buffer=4, prefetch_factor=3)
    batches = list(loader)
    assert len(loader) == len(batches) == 5  # with_epoch on the loader counts batches (pitfall 1)
    assert loader.pipeline[0].prefetch_factor == 3  # passed through to the DataLoader
    assert all(b["latents"].shape == (3, 3, 8, 8) and b["tokens"].shape[0] == 3 for b in batches)


def test_failed_run_keeps_the_previous_output(project, monkeypatch):
    from pipeline import encode_latents as stage

    def broken(vae, samples, batch_size, flip):
        yield from []
        raise RuntimeError("killed mid-run")

    monkeypatch.chdir(project["root"])
    monkeypatch.setattr(stage, "encode_records", broken)
    with pytest.raises(RuntimeError, match="killed"):
        stage.run(EncodeLatentsConfig(batch_size=3))
    assert _hashes(project["root"] / "data/latents") == project["hashes"]
    assert not list(project["root"].glob("data/.latents*")), "temporary folder left behind"


def test_a_posterior_beyond_float16_is_refused_naming_the_sample():
    """encode_latents stores float16; a value it cannot hold (|x| > 65504) must stop the stage, not land on
    disk as inf. The check must look at the float16 values, not at the float32 ones (which are finite)."""
    from types import SimpleNamespace

    from diffusion.data.latents import encode_batch

    class HugeVAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def encode(self, x):
            mean = torch.zeros(len(x), 4, 2, 2)
            mean[1, 0, 0, 0] = 7e4  # finite in float32, inf in float16
            return SimpleNamespace(mean=mean, logvar=torch.zeros_like(mean))

    with pytest.raises(ValueError, match=r"mean is not finite in float16 for samples \['b'\]"):
        encode_batch(HugeVAE(), torch.zeros(2, 3, 8, 8), ["a", "b"])


def test_a_killed_run_resumes_at_its_first_unfinished_shard(project, tmp_path, monkeypatch, capsys):
    """Killed while encoding the second of the train split's three shards: the rerun encodes only the shards not
    finished (two train, one val) and writes what an uninterrupted run writes, byte for byte; the resume folder
    is gone once the output is in place."""
    from pipeline import encode_latents as stage

    monkeypatch.chdir(project["root"])
    cfg = EncodeLatentsConfig(batch_size=3, checkpoint_dir=str(tmp_path / "ckpt"))
    stage.run(cfg.replace(out_dir=str(tmp_path / "whole")))
    whole = _hashes(tmp_path / "whole")
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())

    real, calls = stage.encode_records, []

    def encode(vae, samples, batch_size, flip, fail_at=None):
        calls.append(1)
        for i, record in enumerate(real(vae, samples, batch_size, flip)):
            if len(calls) == fail_at and i == 2:
                raise KeyboardInterrupt  # mid-shard
            yield record

    out = cfg.replace(out_dir=str(tmp_path / "resumed"))
    monkeypatch.setattr(stage, "encode_records", lambda *a: encode(*a, fail_at=2))
    with pytest.raises(KeyboardInterrupt):
        stage.run(out)
    kept = stage.resume_folder(out)
    assert kept is not None and sorted(p.name for p in (kept / "train").glob("*.tar")) == ["shard-000000.tar"]
    assert not (tmp_path / "resumed").exists()

    assert "the 1 latent shard(s) finished are kept in" in capsys.readouterr().err  # said on the way out

    calls.clear()
    monkeypatch.setattr(stage, "encode_records", lambda *a: encode(*a))
    result = stage.run(out)
    assert len(calls) == 3  # train shards 1 and 2, the val shard: not shard 0 again
    assert result["reused_samples"] == 4 and "4 taken from an interrupted run's shards" in capsys.readouterr().out
    assert _hashes(tmp_path / "resumed") == whole
    assert not kept.exists()
    # Another output folder has its own key: a reference run beside a killed one does not take its shards.
    assert stage.resume_folder(cfg.replace(out_dir=str(tmp_path / "other"))) != kept


def test_the_resume_key_changes_with_what_decides_the_bytes(project, tmp_path, monkeypatch):
    """A resume folder is reused only by a run that would write the same shards: not after another batch size
    (oneDNN may round batches differently), another VAE, or with re-chunked output (batches cross shards)."""
    from pipeline import encode_latents as stage

    monkeypatch.chdir(project["root"])
    cfg = EncodeLatentsConfig(batch_size=3)
    key = stage.resume_folder(cfg)
    assert key == stage.resume_folder(cfg.replace(out_dir=f"./{cfg.out_dir}/"))  # the same folder, typed otherwise
    assert stage.resume_folder(cfg.replace(batch_size=4)) != key
    assert stage.resume_folder(cfg.replace(samples_per_shard=6)) is None
    vae = tmp_path / "vae"
    shutil.copytree(project["root"] / "models/vae", vae)
    assert stage.resume_folder(cfg.replace(vae_dir=str(vae))) == key  # the same files elsewhere
    config = json.loads((vae / "config.json").read_text())
    (vae / "config.json").write_text(json.dumps({**config, "latent_scale": 2.0}))
    assert stage.resume_folder(cfg.replace(vae_dir=str(vae))) != key
