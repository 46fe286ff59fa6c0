"""The attribute judge that scores prompt adherence (``diffusion.evaluation.judge``) and its stage's edge cases.

The judge tests use shapes images generated in memory (no shards: faster); train_judge's normal run is
tested with the other stages in test_evaluate.py.
"""

from collections import Counter

import pytest
import torch
from conftest import shapes_images

from diffusion.data.in_memory import to_uint8
from diffusion.eval_configs import JudgeConfig
from diffusion.evaluation.judge import (
    JudgeTrainSettings,
    accuracy,
    build_vocab,
    encode_labels,
    train_judge,
)
from diffusion.evaluation.metrics import adherence


@pytest.fixture(scope="module")
def trained_judge():
    train = shapes_images(1500, "train")
    vocab = build_vocab(None, train.attributes)
    judge, losses = train_judge(train, vocab, JudgeTrainSettings(steps=300, batch_size=48, warmup_steps=10),
                                progress=False)
    return judge, losses, shapes_images(96, "val")


def test_judge_reads_real_images_and_is_not_trivially_satisfied(trained_judge):
    judge, losses, val = trained_judge
    assert losses[-1] < losses[0] / 3
    real = accuracy(judge, val)
    assert real["all_correct"] >= 0.8, real

    # Random noise: the judge must not find the prompt's attributes in it.
    noise = torch.randint(0, 256, val.images.shape, generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    _, preds = judge.judge(noise.float().div(127.5).sub(1.0))
    noise_score = adherence(preds, encode_labels(judge.vocab, val.attributes))["all_correct"]

    # Images made for other prompts: real val images scored against a shifted list of prompts.
    shuffled = [val.attributes[(i + 1) % len(val)] for i in range(len(val))]
    _, preds = judge.judge(val.float_images())
    other_score = adherence(preds, encode_labels(judge.vocab, shuffled))["all_correct"]
    assert noise_score <= 0.1 and other_score <= 0.1, (noise_score, other_score)
    assert real["all_correct"] - max(noise_score, other_score) >= 0.7


def test_judge_round_trips_and_is_deterministic(trained_judge, tmp_path):
    from diffusion.evaluation.judge import AttributeJudge

    judge, _, val = trained_judge
    judge.save(tmp_path / "judge")
    loaded = AttributeJudge.load(tmp_path / "judge")
    x = val.float_images()[:8]
    assert torch.equal(judge.judge(x)[0], loaded.judge(x)[0])
    assert judge.judge(torch.nn.functional.interpolate(x, scale_factor=2))[0].shape == (8, judge.feature_dim)
    small = shapes_images(64, "train")
    settings = JudgeTrainSettings(steps=3, batch_size=8, channels=(4, 8), feature_dim=8)
    a, _ = train_judge(small, build_vocab(None, small.attributes), settings, progress=False)
    b, _ = train_judge(small, build_vocab(None, small.attributes), settings, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(to_uint8(val.float_images()), val.images)


class _IdentityVAE(torch.nn.Module):
    """A stand-in LatentDiffusionModel whose VAE reconstructs perfectly: decode(encode(x)) = x."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # gives it a device, as the real model has

    @property
    def device(self) -> torch.device:
        return self.unused.device

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_vae_ceiling_equals_the_real_ceiling_for_a_perfect_vae_and_drops_for_a_useless_one(trained_judge):
    """judge_vae_* is the judge on the reconstructions: a VAE that returns its input scores exactly what the real
    images score (and `reconstruct` round-trips uint8 exactly); one that returns grey loses the attributes."""
    from diffusion.evaluation.metrics import judge_ceilings
    from pipeline.evaluate import reconstruct

    judge, _, val = trained_judge
    same = reconstruct(_IdentityVAE(), val.images, batch_size=40)  # 3 batches, the last one short
    assert torch.equal(same, val.images)
    scores, feats = judge_ceilings(judge, val, same)
    assert feats.shape == (len(val), judge.feature_dim)
    real = {k[len("judge_real_"):]: v for k, v in scores.items() if k.startswith("judge_real_")}
    vae = {k[len("judge_vae_"):]: v for k, v in scores.items() if k.startswith("judge_vae_")}
    assert set(real) == {"adherence", "acc_color", "acc_shape", "acc_position", "acc_size"} and vae == real
    assert real["adherence"] == pytest.approx(accuracy(judge, val)["all_correct"])

    grey, _ = judge_ceilings(judge, val, torch.full_like(val.images, 128))
    assert grey["judge_vae_adherence"] <= 0.1 < grey["judge_real_adherence"]
    assert grey["judge_real_adherence"] == scores["judge_real_adherence"]
    with pytest.raises(ValueError, match="one reconstruction per real image"):
        judge_ceilings(judge, val, val.images[:3])


def test_train_judge_without_attributes_leaves_an_empty_judge(tmp_path):
    """Data without attributes (e.g. captioned photos): no judge, and evaluate falls back to FID/KID only."""
    from PIL import Image

    from diffusion.data.records import Sample
    from diffusion.data.shards import write_shards
    from pipeline import train_judge
    from pipeline.evaluate import load_judge

    samples = [Sample(f"k{i}", Image.new("RGB", (16, 16), (i * 20, 0, 0)), f"photo {i}", {}) for i in range(6)]
    for split in ("train", "val"):
        write_shards(samples, tmp_path / "shards" / split, samples_per_shard=10)
    cfg = JudgeConfig(shards_dir=str(tmp_path / "shards"), out_dir=str(tmp_path / "judge"),
                      metrics_path=str(tmp_path / "judge.json"), steps=2)
    assert train_judge.run(cfg)["attributes"] == 0
    assert load_judge(cfg.out_dir) is None


def test_train_judge_metrics_file_is_strict_json_when_val_lacks_an_attribute(tmp_path):
    """An attribute no val image names has no accuracy (NaN); metrics/judge.json must still be valid JSON."""
    import json

    from PIL import Image

    from diffusion.data.records import Sample
    from diffusion.data.shards import write_shards
    from pipeline import train_judge

    def samples(n, colour):
        return [Sample(f"k{i}", Image.new("RGB", (16, 16), (i * 20, 40, 0)), "a thing",
                       {"attributes": {"shape": ["circle", "square"][i % 2], **({"color": "red"} if colour else {})}})
                for i in range(n)]

    write_shards(samples(8, True), tmp_path / "shards/train", samples_per_shard=10)
    write_shards(samples(4, False), tmp_path / "shards/val", samples_per_shard=10)
    cfg = JudgeConfig(shards_dir=str(tmp_path / "shards"), out_dir=str(tmp_path / "judge"),
                      metrics_path=str(tmp_path / "judge.json"), steps=2, batch_size=4)
    metrics = train_judge.run(cfg)
    assert metrics["val_acc_color"] != metrics["val_acc_color"]  # NaN: no val image names a colour

    def refuse(constant):
        raise ValueError(constant)

    written = json.loads((tmp_path / "judge.json").read_text(), parse_constant=refuse)
    assert "val_acc_color" not in written and "val_acc_shape" in written


def test_degrade_blurs_and_adds_noise_reproducibly_and_is_identity_when_off():
    from diffusion.evaluation.judge import degrade

    torch.manual_seed(0)
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    assert torch.equal(degrade(images, 0.0, 0.0, torch.Generator().manual_seed(1)), images)
    blurred = degrade(images, 1.5, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(blurred, degrade(images, 1.5, 0.0, torch.Generator().manual_seed(1)))

    def tv(x):  # total variation: blurring lowers it
        return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()

    assert tv(blurred) < 0.8 * tv(images)
    flat = torch.full((2, 3, 8, 8), 0.3)  # a constant image stays constant (normalised kernel, replicate pad)
    assert torch.allclose(degrade(flat, 1.5, 0.0, torch.Generator().manual_seed(2)), flat, atol=1e-6)
    noisy = degrade(flat, 0.0, 0.1, torch.Generator().manual_seed(3))
    assert 0.07 < (noisy - flat).std().item() < 0.13


def test_score_images_splits_held_out_and_seen_images():
    from types import SimpleNamespace

    from diffusion.evaluation.metrics import score_images

    preds = {"color": torch.tensor([0, 1, 0, 0])}  # image 1 (held out) read wrong
    judge = SimpleNamespace(vocab={"color": ["red", "blue"]},
                            judge=lambda images: (torch.zeros(len(images), 2), preds))
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    out, _ = score_images(judge, images, [{"color": "red"}] * 4, torch.tensor([True, True, False, False]))
    assert out["adherence"] == pytest.approx(0.75)
    assert out["adherence_heldout"] == pytest.approx(0.5) and out["adherence_seen"] == pytest.approx(1.0)
    assert out["heldout_count"] == 2


def test_load_split_limit_is_a_uniform_seeded_choice_read_in_one_pass(tmp_path, monkeypatch):
    """`limit` (train_judge.max_train_images, evaluate.num_samples) draws uniformly over the whole split and keeps
    shard order; it took the first `limit`, which for class folders (keys, so shards, sorted by class) are the
    first classes only. Samples the reservoir does not take are never decoded; ones without attributes neither."""
    from PIL import Image

    import diffusion.data.shard_reading as reading
    from diffusion.data.in_memory import load_split
    from diffusion.data.records import Sample
    from diffusion.data.shards import write_shards

    samples = []
    for c in range(6):  # class-folder order: c0's ten images, then c1's, ...
        samples += [Sample(f"c{c}_{i:02d}", Image.new("RGB", (8, 8), (c * 40, i * 20, 0)), f"c{c} {i}",
                           {"attributes": {"class": f"c{c}"}}) for i in range(10)]
        samples.append(Sample(f"c{c}_plain", Image.new("RGB", (8, 8), (c * 40, 0, 9)), "no attributes", {}))
    urls = [str(p) for p in write_shards(samples, tmp_path / "s", samples_per_shard=25)]
    labelled = [s for s in samples if s.meta]

    decoded = []
    real = reading._decode_rgb
    monkeypatch.setattr(reading, "_decode_rgb", lambda data: decoded.append(1) or real(data))
    chosen = load_split(urls, limit=12, seed=0)
    assert len(chosen) == 12 and chosen.images.shape == (12, 3, 8, 8)
    assert 12 <= len(decoded) < len(labelled)  # the reservoir's draws only
    position = [[s.caption for s in labelled].index(c) for c in chosen.captions]
    assert position == sorted(position)  # shard order
    assert chosen.images[:, :, 0, 0].tolist() == [list(labelled[i].image.getpixel((0, 0))) for i in position]
    assert len({a["class"] for a in chosen.attributes}) >= 4  # the first 12 would be c0 and c1 only

    again = load_split(urls, limit=12, seed=0)
    assert torch.equal(again.images, chosen.images) and again.attributes == chosen.attributes
    assert not torch.equal(load_split(urls, limit=12, seed=1).images, chosen.images)
    everything = load_split(urls, limit=100, seed=0)
    assert torch.equal(everything.images, load_split(urls).images) and len(everything) == len(labelled)
    assert len(load_split(urls, require_attributes=False)) == len(samples)

    # Uniform: over 200 seeds every class is drawn about 200 * 12 / 6 = 400 times.
    monkeypatch.setattr(reading, "_decode_rgb", real)
    per_class = Counter(a["class"] for seed in range(200) for a in load_split(urls, limit=12, seed=seed).attributes)
    assert all(320 < per_class[f"c{c}"] < 480 for c in range(6)), per_class
