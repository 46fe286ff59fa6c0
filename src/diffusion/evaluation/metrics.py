"""Prompt adherence from the judge's verdicts, and the Fréchet distance between two feature sets.

Prompt adherence asks of each generated image: does the judge read *every* attribute its prompt named?
The fraction of images where it does is the headline figure; per-attribute accuracy says which attribute
fails (colour is usually learnt first, position and shape later). Scored on real val images against their
own attributes, the same function gives the judge's accuracy: the ceiling of the generator's adherence.
:func:`score_images` runs the judge on generated images and reports both figures in one flat mapping.

The Fréchet distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
Local Nash Equilibrium", eq. 6: the 2-Wasserstein distance between Gaussians fitted to two feature sets)
is computed here in float64 for any features, without scipy: the matrix square root comes from symmetric
eigen-decompositions (see :func:`frechet_distance`). Used on the judge's features, it is a fast,
domain-specific companion of the Inception FID (``evaluation.fid``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from diffusion.evaluation.judge import IGNORE, AttributeJudge, encode_labels


def adherence(
    predicted: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], mask: torch.Tensor | None = None
) -> dict[str, float]:
    """Score predicted attribute classes against the wanted ones.

    Args:
        predicted: {attribute: (N,) long} the judge's class per image.
        target: {attribute: (N,) long} the prompt's class per image; ``IGNORE`` where the prompt does not
            name the attribute (it is then neither required nor scored).
        mask: (N,) bool, which images to score (e.g. the held-out combinations); None: all.
    Returns:
        ``all_correct``: fraction of scored images whose every named attribute matches;
        ``acc_<attribute>``: per-attribute accuracy over the images naming it; ``count``: images scored.
        Fractions are NaN when nothing is scored.
    """
    names = [n for n in target if n in predicted]
    if not names:
        return {"all_correct": float("nan"), "count": 0}
    n = len(target[names[0]])
    keep = torch.ones(n, dtype=torch.bool) if mask is None else mask.to(torch.bool).cpu()
    named = torch.zeros(n, dtype=torch.bool)
    all_ok = torch.ones(n, dtype=torch.bool)
    out: dict[str, float] = {}
    for name in names:
        t, p = target[name].cpu(), predicted[name].cpu()
        has = (t != IGNORE) & keep
        ok = p == t
        out[f"acc_{name}"] = float(ok[has].float().mean()) if has.any() else float("nan")
        named |= has
        all_ok &= ok | (t == IGNORE)
    scored = named & keep
    out["all_correct"] = float(all_ok[scored].float().mean()) if scored.any() else float("nan")
    out["count"] = int(scored.sum())
    return out


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix: V diag(sqrt(max(w, 0))) V^T."""
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0.0).sqrt()) @ v.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, eq. 6)::

        d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))

    tr((S_a S_b)^(1/2)) equals tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), whose argument is symmetric PSD, so both
    roots come from ``eigh`` (real, stable) instead of scipy's ``sqrtm`` of a non-symmetric product. In
    float64: the trace is a small difference of large sums.

    Args:
        a: (N, D) features; b: (M, D) features; N, M >= 2.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected (N, D) and (M, D) features, got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least two samples in each set")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    d = a.shape[1]
    cov_a, cov_b = torch.cov(a.T).reshape(d, d), torch.cov(b.T).reshape(d, d)  # (D, D), unbiased (np.cov)
    root_a = _sqrtm_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0.0).sqrt().sum()
    d2 = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2.0 * cross
    return float(d2.clamp(min=0.0))


def score_images(
    judge: AttributeJudge, images: torch.Tensor, wanted: Sequence[Mapping[str, str]], holdout: torch.Tensor | None = None,
    real_features: torch.Tensor | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Judge generated images against the attributes their prompts asked for.

    Args:
        images: (N, 3, H, W) uint8.
        wanted: the prompt's attributes per image.
        holdout: (N,) bool, images of held-out combinations; when any, ``adherence_heldout`` and
            ``adherence_seen`` are reported too.
        real_features: (M, feature_dim) judge features of real images, for ``judge_fd``.
    Returns:
        (flat metrics: ``adherence``, ``acc_<attribute>``, ..., the images' judge features (N, feature_dim)).
    """
    feats, preds = judge.judge(images.float().div(127.5).sub(1.0))
    target = encode_labels(judge.vocab, wanted)
    overall = adherence(preds, target)
    out = {"adherence": overall["all_correct"], **{k: v for k, v in overall.items() if k.startswith("acc_")}}
    if holdout is not None and holdout.any():
        out["adherence_heldout"] = adherence(preds, target, holdout)["all_correct"]
        out["adherence_seen"] = adherence(preds, target, ~holdout)["all_correct"]
        out["heldout_count"] = int(holdout.sum())
    if real_features is not None:
        out["judge_fd"] = frechet_distance(real_features, feats)
    return out, feats
