"""Rehearsal while fine-tuning (``train.replay``): a share of the training samples drawn from other latents.

Fine-tuned on new data alone, a network drifts from what it knew: nothing in the loss asks for the old skill any
more (catastrophic forgetting, McCloskey & Cohen 1989). The oldest remedy is to keep showing it some of the old
data (rehearsal, Robins 1995; "experience replay" in continual learning). DreamBooth's prior preservation (Ruiz et
al. 2023; diffusers' ``--with_prior_preservation``) is the same idea with images the model generated of its own
class. Here the old data is any set of latent shards encoded by the run's VAE, usually the pipeline's
``data/latents`` that the ``train.init_from`` model was trained on: with ``train.replay.fraction`` p, each training
sample comes from ``train.replay.latents_dir`` with probability p, else from ``train.latents_dir``
(``data.loader._mix``, before the shuffle buffer, seeded as every other draw of the loader). The validation loss
stays the new data's.

Both sets go through one denoiser in one batch, so they must be one latent space (the same VAE encoder) and one
size; both are checked before any work (:func:`replay_urls`). The replayed shards are part of the run's data
fingerprint (its checkpoint key), by content as ``train.latents_dir``'s.
"""

from __future__ import annotations

from typing import Any

KEY = "train.replay.latents_dir"


def replay_urls(cfg: Any, latent_shape: list[int] | None, error: type[Exception]) -> list[str]:
    """The train shards of ``cfg.replay.latents_dir`` ([] without replay), after checking that an encode_latents
    manifest beside them names the VAE encoder of ``cfg.vae_dir`` and the run's latent shape `latent_shape` ([C, h,
    w], None if unknown). Raises `error` naming the key."""
    if cfg.replay.latents_dir is None:
        return []
    from diffusion.data.locations import read_manifest, require_split
    from diffusion.training.latent_stats import encoded_elsewhere

    folder = cfg.replay.latents_dir
    urls = require_split(folder, "train", KEY, "encode_latents", error, "latent shards")
    manifest = read_manifest(folder) or {}
    if detail := encoded_elsewhere(manifest, cfg.vae_dir):
        raise error(f"{KEY}: the latents in {folder} were encoded by another VAE than the one in train.vae_dir "
                    f"({cfg.vae_dir}; {detail}); mixed into one run, they would teach the denoiser two latent spaces "
                    f"at once. Encode their images with this VAE (`python cli.py encode-latents -S "
                    f"encode_latents.vae_dir={cfg.vae_dir} ...`)")
    shape = manifest.get("latent_shape")
    if shape and latent_shape and list(shape) != list(latent_shape):
        raise error(f"{KEY}: latents of shape {list(shape)} in {folder}, and {list(latent_shape)} in "
                    f"train.latents_dir ({cfg.latents_dir}); one batch holds one size: encode both at the same "
                    "shard.resolution with the same VAE")
    return urls
