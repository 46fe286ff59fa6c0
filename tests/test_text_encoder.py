"""Tiny-config tests of the CLIP-like text encoder (diffusion.models.text_encoder)."""

import pytest
import torch

from diffusion.config import ConfigError
from diffusion.models.text_encoder import TextEncoder, TextEncoderConfig

PAD, BOS, EOS = 0, 2, 3


def tiny(**kw) -> TextEncoder:
    torch.manual_seed(0)
    cfg = TextEncoderConfig(**{"vocab_size": 50, "max_length": 32, "width": 32, "depth": 2, "num_heads": 4, **kw})
    return TextEncoder(cfg).eval()


def caption(ids: list[int], length: int) -> torch.Tensor:
    return torch.tensor([BOS, *ids, EOS] + [PAD] * (length - len(ids) - 2))


def test_shapes():
    enc = tiny()
    tokens = torch.stack([caption([5, 6, 7], 16), caption([8], 16)])
    states, pooled = enc(tokens)
    assert states.shape == (2, 16, 32)
    assert pooled.shape == (2, 32)
    assert torch.isfinite(states).all()


def test_padding_invariance():
    enc = tiny()
    ids = [5, 6, 7, 9, 11]
    s16, p16 = enc(caption(ids, 16)[None])
    s32, p32 = enc(caption(ids, 32)[None])
    n = len(ids) + 2
    torch.testing.assert_close(s16[:, :n], s32[:, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p16, p32, atol=1e-5, rtol=1e-5)


def test_unpadded_matches_padded():
    """A caption filling the whole sequence (no mask, fast kernel) equals the same caption with padding after it."""
    enc = tiny()
    full = caption(list(range(4, 18)), 16)  # 16 real tokens, no padding
    s_full, p_full = enc(full[None])
    s_pad, p_pad = enc(torch.cat([full, torch.zeros(8, dtype=torch.long)])[None])
    torch.testing.assert_close(s_full, s_pad[:, :16], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p_full, p_pad, atol=1e-5, rtol=1e-5)


def test_pooled_is_eos_state():
    enc = tiny()
    tokens = torch.stack([caption([5, 6, 7], 16), caption([8], 16), caption([], 16)])
    states, pooled = enc(tokens)
    for b, eos in enumerate([4, 2, 1]):
        assert tokens[b, eos] == EOS
        torch.testing.assert_close(pooled[b], states[b, eos])


def test_explicit_mask_overrides_pad_id():
    enc = tiny()
    tokens = caption([5, 6], 8)[None]
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, :3] = True  # hide the EOS: the pooled state is then the last visible token's
    states, pooled = enc(tokens, mask)
    torch.testing.assert_close(pooled[0], states[0, 2])


def test_all_padding_row_is_finite():
    enc = tiny()
    states, pooled = enc(torch.zeros(2, 8, dtype=torch.long))
    assert torch.isfinite(states).all() and torch.isfinite(pooled).all()


def test_gradient_reaches_every_parameter():
    enc = tiny(max_length=8)
    enc.train()
    tokens = torch.randint(1, 50, (3, 8))
    tokens[0, 5:] = PAD
    states, pooled = enc(tokens)
    # A random projection: the sum of LayerNorm outputs has zero gradient by construction.
    w = torch.randn(states.shape[-1])
    ((states * w).sum() + (pooled * w).sum()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_too_long_sequence_refused():
    enc = tiny(max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        enc(torch.ones(1, 9, dtype=torch.long))


@pytest.mark.parametrize(
    "data, key",
    [
        ({"vocab_size": 50, "width": 30, "num_heads": 4}, "num_heads"),
        ({"vocab_size": 50, "pad_token_id": 50}, "pad_token_id"),
        ({"vocab_size": 50, "depth": 0}, "depth"),
        ({"vocab_size": 50, "dropout": 1.0}, "dropout"),
        ({"vocab_size": 1}, "vocab_size"),
        ({"vocab_size": 50, "heads": 2}, "heads"),
    ],
)
def test_bad_config_names_key(data, key):
    with pytest.raises(ConfigError, match=key):
        TextEncoderConfig.from_dict(data, "model.text_encoder")


def test_text_encoder_is_bidirectional():
    """Deliberately not CLIP's causal mask (module docstring): every token sees the whole caption, so the BOS
    state changes when a later word does. Causal attention passed every other text-encoder test."""

    enc = tiny()
    a = caption([5, 6, 7], 16)
    b = a.clone()
    b[3] = 9  # the last word before EOS
    with torch.no_grad():
        sa, _ = enc(a[None])
        sb, _ = enc(b[None])
    assert not torch.allclose(sa[0, 0], sb[0, 0], atol=1e-4)  # BOS sees the later token
    assert not torch.allclose(sa[0, 1], sb[0, 1], atol=1e-4)
