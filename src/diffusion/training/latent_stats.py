"""The latent scale and shift, measured on the data, and the VAE artifact that carries them.

A diffusion model's noise schedule assumes data of roughly unit variance. A KL-VAE with a tiny KL weight
makes latents of whatever variance the training settled on, so Latent Diffusion rescales them by their
component-wise standard deviation (Rombach et al. 2022, sec. 4.3.2): its code sets the scale factor to
1 / std of the first batch's latents (0.18215 = 1 / 5.49 *for their KL-f8 on their data*). We measure it
over `scale_batches` batches rather than one, on posterior samples z ~ q(z|x) (what the diffusion model
is trained on, pitfall 3), and store it with the weights (pitfall 4, STYLE 10), so that

    latents = (z - latent_shift) * latent_scale        has mean 0 and variance 1 over the data.

The shift (the mean, as SD3 and FLUX also store) is scalar, like the scale.

The artifact, ``<dir>/``:
    model.pt      the AutoencoderKL state dict (float32), loaded with ``torch.load(weights_only=True)``
    config.json   {"vae": VAEConfig as a mapping, "latent_scale", "latent_shift", "latent_std",
                   "latent_mean", "measured_on": {...}, "format": 1}

Every reader here also takes a text-to-image model's folder (the train stage's out_dir), which holds the VAE it was
trained with: config.json's "vae", "latent_scale" and "latent_shift", and model.pt's ``vae.*`` entries. So a model
copied from elsewhere brings its VAE along, for fine-tuning (``training/init_from.py``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffusion.atomic import staged_dir
from diffusion.models.vae import AutoencoderKL, VAEConfig

ARTIFACT_FORMAT = 1
WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class LatentStats:
    """Statistics of posterior samples over the data: every channel and position pooled (a scalar each).

    Attributes:
        mean, std: of z over all the values seen.
        num_values: how many latent values (B * C * h * w summed over batches) they come from.
        num_batches: how many batches.
    """

    mean: float
    std: float
    num_values: int
    num_batches: int

    @property
    def shift(self) -> float:
        return self.mean

    @property
    def scale(self) -> float:
        """1 / std, so that (z - shift) * scale has unit variance."""
        return 1.0 / self.std


@torch.no_grad()
def measure_latent_stats(
    vae: AutoencoderKL,
    batches: Iterable[Mapping[str, Any] | torch.Tensor],
    num_batches: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> LatentStats:
    """Mean and standard deviation of posterior samples z ~ q(z|x) over up to `num_batches` batches.

    Runs in float32 without autocast (pitfall 10) and accumulates in float64, so millions of
    values do not lose precision. Uses fewer batches if `batches` ends first; raises if it is empty.

    Args:
        vae: the trained autoencoder (put in eval mode here).
        batches: loader batches (``{"image": (B, 3, H, W) in [-1, 1]}``) or image tensors.
        num_batches: how many batches to use at most.
        generator: seeds the posterior noise (reproducible statistics).
        device: where to run; default the VAE's.
    """
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    total = total_sq = 0.0
    count = seen = 0
    try:
        for batch in batches:
            if seen >= num_batches:
                break
            x = batch["image"] if isinstance(batch, Mapping) else batch
            with torch.autocast(device_type=device.type, enabled=False):
                z = vae.encode(x.to(device=device, dtype=torch.float32)).sample(generator)  # (B, C, h, w)
            z = z.double()
            total += z.sum().item()
            total_sq += z.square().sum().item()
            count += z.numel()
            seen += 1
    finally:
        vae.train(was_training)
    if count < 2:
        raise ValueError("measure_latent_stats: no batches to measure the latent scale on")
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0) * count / (count - 1)
    if not math.isfinite(var) or var <= 0.0:
        raise ValueError(f"measure_latent_stats: latent variance is {var}; the VAE's latents are degenerate")
    return LatentStats(mean=mean, std=math.sqrt(var), num_values=count, num_batches=seen)


def save_vae(vae: AutoencoderKL, stats: LatentStats, out_dir: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the VAE artifact (weights, config, latent scale and shift) to `out_dir`, atomically.

    Everything goes to a hidden sibling folder that replaces `out_dir` only once complete, so a killed
    run leaves the previous artifact or none, never weights without their scale.
    """
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        state = {k: v.detach().float().cpu().contiguous() for k, v in vae.state_dict().items()}
        torch.save(state, tmp / WEIGHTS_FILE)
        config = {
            "format": ARTIFACT_FORMAT,
            "vae": vae.cfg.to_dict(),
            "latent_scale": stats.scale,
            "latent_shift": stats.shift,
            "latent_std": stats.std,
            "latent_mean": stats.mean,
            "measured_on": {"num_batches": stats.num_batches, "num_values": stats.num_values},
            **(dict(extra) if extra else {}),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def read_vae_config(vae_dir: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a VAE artifact; a clear error names the folder and the stage."""
    path = Path(vae_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: VAE artifact not found. It is written by the train_vae stage: run `python cli.py train-vae` "
            "(or `dvc repro train_vae`) first"
        )
    config = json.loads(path.read_text())
    if isinstance(config, dict) and "denoising_type" in config and "vae" in config:
        # A text-to-image model's folder (the train stage's out_dir) holds its VAE too: what fine-tuning reads
        # (training/init_from.py). Its weights are model.pt's vae.* entries (_vae_state).
        return {"format": ARTIFACT_FORMAT, "vae": config["vae"], "latent_scale": config["latent_scale"],
                "latent_shift": config["latent_shift"]}
    if config.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{path}: unknown VAE artifact format {config.get('format')!r} (expected {ARTIFACT_FORMAT})")
    return config


def vae_problem(vae_dir: str | Path) -> str | None:
    """What is wrong with the VAE artifact in `vae_dir` (missing, or its weights file cut short), or None: checked
    by the stages that read it before they start, since torch.load's own error names no file."""
    import zipfile

    config, weights = Path(vae_dir) / CONFIG_FILE, Path(vae_dir) / WEIGHTS_FILE
    if not config.is_file() or not weights.is_file():
        return f"no VAE in {vae_dir} (no {config.name if not config.is_file() else weights.name})"
    try:
        zipfile.ZipFile(weights).close()  # torch.save's format: the index is at the end, so a cut file fails
    except (zipfile.BadZipFile, OSError) as e:
        return f"{weights}: damaged ({e})"
    return None


def encoder_digest(vae_dir: str | Path) -> str:
    """sha256 of what the latents of the VAE artifact in `vae_dir` depend on: its encoder's weights (``encoder.*``,
    ``quant_conv.*``) and its log-variance clamp. encode_latents records it in its manifest and the train stage
    compares it with its own VAE's, so latents from another VAE stop the stage instead of training a denoiser that
    decodes through the wrong one. Not the decoder (a VAE whose decoder alone was fine-tuned, as Stable Diffusion's
    ft-MSE VAE was, encodes the same latents), nor the scale and shift (applied when latents are read, pitfall 4)."""
    import hashlib

    state = _vae_state(vae_dir, "cpu")
    h = hashlib.sha256(json.dumps(read_vae_config(vae_dir)["vae"].get("logvar_clamp")).encode())
    for name in sorted(k for k in state if k.startswith(("encoder.", "quant_conv."))):
        tensor = state[name]
        h.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        h.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()



def encoded_elsewhere(manifest: dict[str, Any], vae_dir: str | Path) -> str | None:
    """Why the latents whose encode_latents manifest is `manifest` are not the VAE's in `vae_dir` (``encoder sha256
    <theirs>, of <folder> when they were encoded, against <ours>``), or None: they are, or the manifest predates the
    record. A denoiser learns one VAE's latent space and samples decode through its decoder."""
    encoded_by = (manifest.get("vae") or {}).get("encoder_sha256")
    if encoded_by and encoded_by != (ours := encoder_digest(vae_dir)):
        return (f"encoder sha256 {encoded_by[:12]}, of {manifest['vae'].get('dir')} when they were encoded, against "
                f"{ours[:12]}")
    return None


def _vae_state(vae_dir: str | Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    """The VAE's state dict from `vae_dir`'s model.pt: all of it in a VAE artifact, the ``vae.*`` entries (prefix
    removed) in a text-to-image model's folder, whose VAE keys all start with ``vae.``."""
    # weights_only: never unpickle arbitrary objects from a file a user hands in (pitfall 14).
    state = torch.load(Path(vae_dir) / WEIGHTS_FILE, map_location=map_location, weights_only=True)
    if any(k.startswith("encoder.") for k in state):
        return state
    return {k.removeprefix("vae."): v for k, v in state.items() if k.startswith("vae.")}


def load_vae(vae_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[AutoencoderKL, float, float]:
    """Load the VAE artifact written by :func:`save_vae`.

    Returns:
        (the AutoencoderKL in eval mode, float32, latent_scale, latent_shift), to be used as
        ``latents = (vae.encode(x).sample() - shift) * scale`` and ``x = vae.decode(latents / scale + shift)``.
    """
    config = read_vae_config(vae_dir)
    vae = AutoencoderKL(VAEConfig.from_dict(config["vae"], "vae"))
    vae.load_state_dict(_vae_state(vae_dir, map_location))
    return vae.to(map_location).float().eval(), float(config["latent_scale"]), float(config["latent_shift"])


def stats_dict(stats: LatentStats) -> dict[str, float]:
    """The statistics as plain data for metrics files and MLflow."""
    return {"latent_scale": stats.scale, "latent_shift": stats.shift, "latent_std": stats.std, "latent_mean": stats.mean}
