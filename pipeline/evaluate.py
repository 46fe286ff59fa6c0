"""Stage `evaluate`: how well the trained model follows its prompts, and how real it looks.

`evaluate` (``diffusion.eval_configs.EvaluateConfig``) loads the EMA model from ``train`` and

1. picks `num_samples` val samples (seeded) and uses their captions as prompts (or canonical captions of
   their attributes), generates one image per prompt with the main sampler setting, and reports prompt
   adherence (overall, per attribute, on held-out combinations), the judge's Fréchet distance, Inception
   FID and KID against the same real val images, and images/s; beside them two ceilings, the judge's
   adherence on those real images (``judge_real_*``: how well the judge reads) and on their VAE
   reconstructions decode(encode(x).mean) (``judge_vae_*``: every sample comes out of that decoder, so this
   is about the most the latent space allows, a reference rather than a strict bound; a low value means the
   VAE, not the denoiser, loses the attributes);
2. runs the sweep: each {sampler, steps, guidance} on the first `sweep_samples` prompts, for adherence,
   judge FD and images/s (no FID: the Inception network costs ~130 ms per image on the CPU);
3. draws ``reports/samples.png`` (grid prompts x seeds, each prompt written under its column);
4. writes ``metrics/eval.json`` (flat numbers) and the sweep CSV, logs all of it to one MLflow run (with the
   denoiser's type and parameter count as params, so U-Net and DiT runs tell apart), and registers the
   pipeline as an MLflow pyfunc model (``evaluation/pyfunc.py``).

Everything is seeded: the same model, params and seed give the same figures.
"""

from __future__ import annotations

import csv
import io
import json
import math
import pickle
import time
from pathlib import Path
from typing import Any

import torch

from diffusion.config import ConfigError
from diffusion.data.locations import require_split
from diffusion.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from diffusion.data.in_memory import LabelledImages, load_split, to_uint8
from diffusion.evaluation.judge import AttributeJudge
from diffusion.evaluation.metrics import judge_ceilings, score_images
from diffusion.eval_configs import EvaluateConfig, SweepEntry
from diffusion.tracking import is_finite_number, shared_across_experiments

STAGE = "evaluate"


class EvaluateError(RuntimeError):
    """An input of evaluate is missing; nothing was written."""


def validate(cfg: EvaluateConfig) -> list[str]:
    """Check the inputs before any work; return the val shards. Errors name the stage to run."""
    # The device first, as the training stages check their hardware first: with the gpu profile on a machine without
    # a GPU, no other input is the problem.
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("evaluate.device: 'cuda' requested but no GPU is available; use 'cpu' or 'auto'")
    model = Path(cfg.model_dir)
    if not all((model / f).is_file() for f in ("config.json", "model.pt", "tokenizer.json", "train_config.json")):
        raise EvaluateError(f"evaluate.model_dir: no trained model in {cfg.model_dir}; run `python cli.py train` "
                            "(or `dvc repro train`) first")
    if not (Path(cfg.judge_dir) / "config.json").is_file():
        raise EvaluateError(f"evaluate.judge_dir: no judge in {cfg.judge_dir}; run `python cli.py train-judge` "
                            "(or `dvc repro train_judge`) first")
    _check_steps(cfg, model)
    if cfg.fid:
        from diffusion.evaluation.fid import InceptionUnavailable, inception_path

        try:
            inception_path()
        except InceptionUnavailable as e:
            raise EvaluateError(f"evaluate.fid: {e} (or set evaluate.fid false)") from e
    return require_split(cfg.shards_dir, "val", "evaluate.shards_dir", "shard", EvaluateError)


def _check_steps(cfg: EvaluateConfig, model: Path) -> None:
    """Every setting's steps within the model's T, so a sweep entry cannot fail after the main setting ran."""
    from diffusion.model_spec import ModelNotFoundError, read_json

    try:
        T = int(read_json(model / "train_config.json")["scheduler"]["num_timesteps"])
    except (ModelNotFoundError, KeyError, TypeError, ValueError) as e:
        raise EvaluateError(f"evaluate.model_dir: {model}/train_config.json has no scheduler.num_timesteps ({e})") from e
    settings = {"evaluate.steps": cfg.steps, **{f"evaluate.sweep[{i}].steps": e.steps for i, e in enumerate(cfg.sweep)}}
    for key, steps in settings.items():
        if steps is not None and steps > T:
            raise ConfigError(f"{key}: at most the model's scheduler.num_timesteps ({T}), got {steps}")


def _device(cfg: EvaluateConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def load_generator(model_dir: str, device: torch.device) -> tuple[Any, Any, Any]:
    """(LatentDiffusionModel with the EMA weights, the scheduler it was trained with, the tokenizer), read as
    ``cli.py sample`` reads them (`TextToImagePipeline.from_pretrained`): a damaged file is named, with the stage
    that writes it, rather than surfacing as torch's or json's traceback."""
    from diffusion.model_spec import ModelNotFoundError
    from diffusion.pipeline_model import TextToImagePipeline

    try:
        pipe = TextToImagePipeline.from_pretrained(model_dir, device=device.type)
    except ModelNotFoundError as e:
        raise EvaluateError(f"evaluate.model_dir: {e}") from None
    return pipe.model, pipe.scheduler, pipe.tokenizer


def load_judge(judge_dir: str) -> AttributeJudge | None:
    """The judge, or None when train_judge found no attributes (FID/KID only). A judge folder that cannot be read
    (a cut weights file, a damaged config) is an EvaluateError naming it."""
    try:
        config = json.loads((Path(judge_dir) / "config.json").read_text())
        return AttributeJudge.load(judge_dir) if config.get("vocab") else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError, EOFError,
            pickle.UnpicklingError) as e:  # json's, a bad config's and torch's errors for a bad archive
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise EvaluateError(f"evaluate.judge_dir: the judge in {judge_dir} cannot be read ({type(e).__name__}: "
                            f"{first}); rerun `python cli.py train-judge` (or `dvc repro train_judge`)") from None


def choose_prompts(cfg: EvaluateConfig, val_urls: list[str], require_attributes: bool = True
                   ) -> tuple[LabelledImages, list[str]]:
    """`num_samples` val samples (a seeded, uniform choice, kept in shard order; all if fewer) and their prompts.
    Only the chosen images are held in memory (``load_split``'s reservoir): a large val split is never loaded
    whole."""
    from diffusion.data.shape_captions import canonical_caption

    val = load_split(val_urls, limit=cfg.num_samples, require_attributes=require_attributes, seed=cfg.seed)
    if cfg.prompts == "caption":
        return val, list(val.captions)
    try:
        return val, [canonical_caption(a) for a in val.attributes]
    except ValueError as e:  # not the built-in dataset's attributes: there is no canonical phrasing
        raise EvaluateError(f"evaluate.prompts: 'canonical' needs the shapes dataset's attributes ({e}); "
                            "use prompts: caption") from None


def generate(model: Any, scheduler: Any, tokenizer: Any, prompts: list[str], setting: SweepEntry, side: int,
             batch_size: int, seed: int) -> tuple[torch.Tensor, float]:
    """Images for `prompts` with one sampler setting: ((N, 3, side, side) uint8, seconds spent sampling).

    One seeded CPU generator draws all the noise, in order: the same seed gives the same images, on any device.
    """
    from tqdm import tqdm

    from diffusion.data.tokenizer import encode

    gen = torch.Generator().manual_seed(seed)
    steps = setting.steps or scheduler.num_timesteps  # null: the full chain (DDPM over every timestep)
    # One untimed single-step call on the first batch, with its own generator (the images do not change):
    # images/s is then the steady rate, without the first call's set-up (CUDA context and kernel choice,
    # oneDNN's primitive creation), which would otherwise fall on whichever setting runs first.
    if prompts:
        model.generate(encode(tokenizer, prompts[:batch_size]), scheduler, num_inference_steps=1,
                       guidance_scale=setting.guidance, image_size=side, sampler=setting.sampler,
                       generator=torch.Generator().manual_seed(seed))
    out, seconds = [], 0.0
    for i in tqdm(range(0, len(prompts), batch_size), desc=f"evaluate {setting.label()}", unit="batch",
                  mininterval=2.0):
        tokens = encode(tokenizer, prompts[i : i + batch_size])
        start = time.perf_counter()
        images = model.generate(tokens, scheduler, num_inference_steps=steps, guidance_scale=setting.guidance,
                                image_size=side, sampler=setting.sampler, generator=gen)  # (B, 3, H, W) in [0, 1]
        if images.is_cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        out.append(images.mul(255.0).round().clamp(0, 255).to(torch.uint8).cpu())
    return torch.cat(out), seconds


def reconstruct(model: Any, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> their VAE reconstructions decode(encode(x).mean), uint8 (N, 3, H, W), in
    batches. ``to_uint8`` of [-1, 1] rounds (x + 1) * 127.5, the same number as :func:`generate`'s
    ((x + 1) / 2) * 255, so these are exactly the images a denoiser that returned a real latent would give."""
    # Each chunk: uint8 -> [-1, 1] (the loader's range) -> reconstruction in [-1, 1] -> uint8 on the CPU.
    chunks = [to_uint8(model.reconstruct(c.to(model.device).float().div(127.5).sub(1.0))).cpu()
              for c in images.split(batch_size)]
    return torch.cat(chunks) if chunks else images.clone()


def run_sweep(cfg: EvaluateConfig, gen_args: tuple, val: LabelledImages, prompts: list[str], side: int,
              judge: AttributeJudge | None, real_feats: torch.Tensor | None, main: tuple) -> list[dict[str, Any]]:
    """Adherence, judge FD and images/s per sweep setting on the first `sweep_samples` prompts (same seed
    for every setting). A sweep entry equal to the main setting reuses the main images of those prompts.

    Each row's judge FD compares its k images with the k real images of the same prompts: a Frechet distance
    grows as the sample count falls (real against real, 128-wide judge features: ~92 at 100 images, ~34 at
    300), so the rows compare with each other, not with the main figure over all `num_samples`."""
    k = min(cfg.sweep_samples, len(prompts))
    reference = real_feats[:k] if real_feats is not None else None  # the chosen val images, in prompt order
    rows = []
    for setting in cfg.sweep:
        if setting == cfg.main_setting():
            images, seconds = main[0][:k], main[1] * k / len(main[0])
        else:
            images, seconds = generate(*gen_args, prompts[:k], setting, side, cfg.batch_size, cfg.seed)
        row: dict[str, Any] = {"label": setting.label(), "sampler": setting.sampler,
                               "steps": setting.steps or gen_args[1].num_timesteps, "guidance": setting.guidance,
                               "images_per_second": len(images) / max(seconds, 1e-9), "samples": len(images)}
        if judge is not None:
            wanted = val.subset(range(k))
            scores, _ = score_images(judge, images, wanted.attributes, wanted.holdout, reference)
            row.update({key: scores[key] for key in ("adherence", "adherence_heldout", "judge_fd") if key in scores})
        rows.append(row)
        print(f"evaluate: sweep {row['label']}: " + ", ".join(
            f"{key} {row[key]:.3f}" for key in ("adherence", "adherence_heldout", "judge_fd", "images_per_second")
            if key in row))
    return rows


def write_sweep(rows: list[dict[str, Any]], path: str) -> None:
    fields = ["label", "sampler", "steps", "guidance", "adherence", "adherence_heldout", "judge_fd",
              "images_per_second", "samples"]
    fields = [f for f in fields if any(f in r for r in rows)] if rows else fields  # `sweep: []`: the header
    buffer = io.StringIO()  # written whole and renamed into place: an interruption keeps the previous table
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buffer.getvalue())


def samples_grid(cfg: EvaluateConfig, gen_args: tuple, side: int) -> Any:
    """reports/samples.png: one column per grid prompt, one row per seed (seed, seed + 1, ...)."""
    from diffusion.evaluation.grid import make_grid

    prompts = list(cfg.grid_prompts)
    rows = [generate(*gen_args, prompts, cfg.main_setting(), side, len(prompts), cfg.seed + r)[0]
            for r in range(cfg.grid_seeds)]
    images = torch.cat(rows).float().div(255.0)  # (seeds * prompts, 3, H, W), row-major
    scale = max(1, math.ceil(128 / side))  # upscale small samples (nearest) so the captions fit under them
    images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    return caption_columns(make_grid(images, nrow=len(prompts)), prompts, side * scale)


def caption_columns(grid: Any, captions: list[str], cell: int, padding: int = 2) -> Any:
    """Add a white band under a make_grid picture with each caption wrapped under its column."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    draw = ImageDraw.Draw(grid)
    lines = [_wrap(c, draw, font, cell) for c in captions]
    line_h = int(draw.textbbox((0, 0), "Ag", font=font)[3]) + 2
    band = max(len(ls) for ls in lines) * line_h + 2 * padding
    out = Image.new("RGB", (grid.width, grid.height + band), "white")
    out.paste(grid, (0, 0))
    draw = ImageDraw.Draw(out)
    for col, ls in enumerate(lines):
        for j, line in enumerate(ls):
            draw.text((padding + col * (cell + padding), grid.height + j * line_h), line, fill="black", font=font)
    return out


def _wrap(text: str, draw: Any, font: Any, width: int) -> list[str]:
    lines: list[str] = []
    for word in (text or "(empty prompt)").split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def _fid(cfg: EvaluateConfig, real: torch.Tensor, fake: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Inception FID and KID of the main setting's images against the same prompts' real val images (whose
    features come from ``cfg.fid_cache_dir`` when an earlier run computed them for the same images)."""
    from diffusion.evaluation.fid import InceptionFeatures, cached_inception_features, fid_kid, inception_features

    extractor = InceptionFeatures(device)
    cache = None if cfg.fid_cache_dir is None else shared_across_experiments(cfg.fid_cache_dir)
    f_real, cached = cached_inception_features(real, cache, cfg.fid_batch_size, extractor, progress="inception real")
    if cached:
        print(f"evaluate: Inception features of the {len(real)} real images from {cache}")
    start = time.perf_counter()
    f_fake = inception_features(fake, cfg.fid_batch_size, extractor, progress="inception generated")
    per_image = (time.perf_counter() - start) / max(len(fake), 1)
    scores = fid_kid(f_real, f_fake, kid_subsets=cfg.kid_subsets, kid_subset_size=cfg.kid_subset_size, seed=cfg.seed)
    return {**scores, "fid_samples": len(fake), "inception_seconds_per_image": per_image}


def load_models(cfg: EvaluateConfig) -> tuple[tuple[Any, Any, Any], AttributeJudge | None]:
    """The generator (model, scheduler, tokenizer) on the stage's device, and the judge (on the CPU until used)."""
    return load_generator(cfg.model_dir, _device(cfg)), load_judge(cfg.judge_dir)


def run(cfg: EvaluateConfig, models: tuple[tuple[Any, Any, Any], AttributeJudge | None] | None = None
        ) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    """Generate, judge, measure, with `models` from :func:`load_models` (loaded here if None). Returns (flat
    metrics, sweep rows, the samples grid as a PIL image)."""
    val_urls = validate(cfg)
    device = _device(cfg)
    (model, scheduler, tokenizer), judge = models or load_models(cfg)
    val, prompts = choose_prompts(cfg, val_urls, require_attributes=judge is not None)
    if len(val) < 2:
        raise EvaluateError(f"evaluate: {len(val)} usable val image(s) in {cfg.shards_dir}/val; at least 2 are needed")
    side = val.images.shape[-1]
    try:
        model._check_size(side)  # refuse an impossible size before sampling anything
    except ValueError as e:
        raise EvaluateError(f"evaluate: the val images cannot be generated by this model: {e}") from None
    gen_args = (model, scheduler, tokenizer)
    main = cfg.main_setting()
    print(f"evaluate: {len(prompts)} val prompts ({cfg.prompts}), {main.label()}, {side} px, on {device}")
    images, seconds = generate(*gen_args, prompts, main, side, cfg.batch_size, cfg.seed)
    metrics: dict[str, Any] = {"num_samples": len(images), "images_per_second": len(images) / seconds,
                               "seconds_per_image": seconds / len(images)}
    real_feats = None
    if judge is None:
        print("evaluate: the data has no attributes (no judge): reporting FID/KID only, no adherence or judge FD")
    else:
        judge = judge.to(device)
        ceilings, real_feats = judge_ceilings(judge, val, reconstruct(model, val.images, cfg.batch_size))
        metrics.update(ceilings)
        metrics.update(score_images(judge, images, val.attributes, val.holdout, real_feats)[0])
    if cfg.fid:
        metrics.update(_fid(cfg, val.images, images, device))
    sweep = run_sweep(cfg, gen_args, val, prompts, side, judge, real_feats, (images, seconds))
    return metrics, sweep, samples_grid(cfg, gen_args, side)


def _register(cfg: EvaluateConfig) -> str | None:
    """Log the pipeline as an MLflow pyfunc model in the active run and register it (name and alias from
    params). Returns the model URI, or None when registration is off or the pyfunc module is missing."""
    if not cfg.register:
        print("evaluate: model registration is off (evaluate.register: false)")
        return None
    try:
        from diffusion.evaluation.pyfunc import log_and_register
    except ImportError as e:  # the pyfunc model is a separate module; evaluation stands without it
        print(f"evaluate: not registering the model: diffusion.evaluation.pyfunc is unavailable ({e})")
        return None
    return log_and_register(cfg.model_dir, cfg.registered_model_name, cfg.registered_model_alias)


def denoiser_params(model_dir: str) -> dict[str, Any]:
    """MLflow params naming the evaluated denoiser, so that U-Net and DiT evaluate runs tell apart in the UI
    (evaluate's own params only name the model folder): ``denoising_type`` from the folder's
    train_config.json and ``parameters_denoiser`` (the name train's metric has), counted on a model built from
    config.json on the ``meta`` device, which allocates no weights."""
    from diffusion.models import LatentDiffusionModel
    from diffusion.models.io import read_config

    train_cfg = json.loads((Path(model_dir) / "train_config.json").read_text())
    with torch.device("meta"):
        model = LatentDiffusionModel(**read_config(model_dir))
    return {"denoising_type": train_cfg.get("denoising_type", model.denoising_type),
            "parameters_denoiser": sum(p.numel() for p in model.denoiser.parameters())}


def main(cfg: EvaluateConfig) -> dict[str, Any]:
    """The DVC stage: validate, evaluate, write metrics/eval.json, the sweep, the grid; log to one MLflow run."""
    import mlflow

    from diffusion.tracking import stage_run, tracking_uri

    validate(cfg)
    models = load_models(cfg)  # before the run opens: a damaged model or judge records no failed run
    with stage_run(STAGE, cfg.to_dict()) as active:
        mlflow.log_params(denoiser_params(cfg.model_dir))
        metrics, sweep, grid = run(cfg, models)
        # The three outputs back to back, before any MLflow call (seconds of logging and registering): a run
        # stopped in between left new metrics beside the previous model's grid.
        png = io.BytesIO()
        grid.save(png, format="PNG")
        Path(cfg.metrics_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cfg.metrics_path, {k: v for k, v in metrics.items() if is_finite_number(v)})
        write_sweep(sweep, cfg.sweep_path)
        atomic_write_bytes(cfg.samples_path, png.getvalue())
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if is_finite_number(v)})
        for row in sweep:
            keys = ("adherence", "adherence_heldout", "judge_fd", "images_per_second")
            mlflow.log_metrics({f"sweep/{row['label']}/{k}": float(row[k])
                                for k in keys if is_finite_number(row.get(k))})
        mlflow.log_artifact(cfg.sweep_path, "plots")
        mlflow.log_image(grid, "samples.png")
        uri = _register(cfg)
        if uri:
            mlflow.set_tag("registered_model_uri", uri)
        _report(cfg, metrics, uri)
        print(f"evaluate: MLflow run {active.info.run_id} at {tracking_uri()}")
    return metrics


def _report(cfg: EvaluateConfig, metrics: dict[str, Any], uri: str | None) -> None:
    keys = ("adherence", "adherence_heldout", "judge_real_adherence", "judge_vae_adherence", "judge_fd", "fid",
            "kid_mean", "kid_std", "images_per_second")
    print("evaluate: " + ", ".join(f"{k} {metrics[k]:.4g}" for k in keys if k in metrics))
    print(f"evaluate: metrics -> {cfg.metrics_path}; sweep -> {cfg.sweep_path}; grid -> {cfg.samples_path}"
          + (f"; model -> {uri}" if uri else ""))
