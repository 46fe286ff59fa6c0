"""Training: Lightning systems (``vae_system``, ``diffusion_system``), callbacks, resumable runs
(``checkpointing``), the stop at a non-finite loss (``nonfinite``), the Trainer (``trainer``) and the VAE artifact with its measured latent scale (``latent_stats``).

Only the torch-level artifact API is imported here, so ``from diffusion.training import load_vae`` does
not pull in Lightning; import the Lightning parts from their modules.
"""

from diffusion.training.latent_stats import LatentStats, load_vae, measure_latent_stats, save_vae

__all__ = ["LatentStats", "load_vae", "measure_latent_stats", "save_vae"]
