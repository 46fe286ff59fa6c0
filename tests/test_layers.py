"""The inference fast paths of the shared layers: the fused CPU linear + GELU of FeedForward, and the text
keys and values that reuse_text_keys_values projects once per sampling run. Both must give what the plain
path gives, be taken where they apply, and stay out of training."""

import pytest
import torch
import torch.nn.functional as F

from diffusion.models import layers
from diffusion.models.dit import DiT, DiTConfig
from diffusion.models.layers import Attention, FeedForward, reuse_text_keys_values
from diffusion.models.unet import UNet, UNetConfig

CTX = 16


@pytest.fixture
def pointwise_calls(monkeypatch):
    """Count the calls of the fused oneDNN op (the real op still runs)."""
    if layers._linear_pointwise is None or not torch.backends.mkldnn.is_available():
        pytest.fail("this PyTorch build has no oneDNN linear_pointwise op: the fused CPU path cannot run")
    calls = []
    real = layers._linear_pointwise

    def counting(*args):
        calls.append(args[3:])  # (attr, scalars, algorithm)
        return real(*args)

    monkeypatch.setattr(layers, "_linear_pointwise", counting)
    return calls


@pytest.mark.parametrize("activation, algorithm", [("gelu_tanh", "tanh"), ("gelu", "none")])
@pytest.mark.parametrize("shape", [(3, 7, 32), (5, 32), "transposed"])
def test_fused_cpu_gelu_is_the_eager_feed_forward(activation, algorithm, shape, pointwise_calls):
    torch.manual_seed(0)
    ff = FeedForward(32, 96, activation=activation)
    x = torch.randn(7, 3, 32).transpose(0, 1) if shape == "transposed" else torch.randn(shape)
    eager = ff(x)  # autograd on: the plain fc1 -> F.gelu -> fc2 path
    assert pointwise_calls == [] and eager.requires_grad
    with torch.no_grad():
        fused = ff(x)
    assert pointwise_calls == [("gelu", [], algorithm)]
    torch.testing.assert_close(fused, eager.detach(), rtol=1e-5, atol=1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(ff(x), eager.detach(), rtol=1e-5, atol=1e-6)
    assert len(pointwise_calls) == 2


def test_fused_path_is_skipped_where_it_does_not_apply(pointwise_calls, monkeypatch):
    torch.manual_seed(0)
    ff = FeedForward(32, 96, activation="gelu_tanh")
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ff.double()(x.double())  # float64: not the fused path
        ff.float()
        FeedForward(32, 96, activation="geglu")(x)  # GEGLU has no single fused form here
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast runs the plain path in bfloat16
            assert ff(x).dtype == torch.bfloat16
        assert pointwise_calls == []
        plain = ff.fc2(F.gelu(ff.fc1(x), approximate="tanh"))
        monkeypatch.setattr(layers, "_linear_pointwise", None)  # a build without oneDNN: the plain path
        torch.testing.assert_close(ff(x), plain, rtol=0, atol=0)


def test_fused_path_respects_hooks_on_the_linear(pointwise_calls):
    """A forward hook (or weight_norm's pre-hook) on fc1 changes what fc1 computes; the fused call reads the
    weight directly, so it must step aside."""
    torch.manual_seed(0)
    ff = FeedForward(32, 96, activation="gelu_tanh")
    x = torch.randn(2, 5, 32)
    handle = ff.fc1.register_forward_hook(lambda m, i, out: out * 0.5)
    with torch.no_grad():
        hooked = ff(x)
        expected = ff.fc2(F.gelu(F.linear(x, ff.fc1.weight, ff.fc1.bias) * 0.5, approximate="tanh"))
    assert pointwise_calls == []
    torch.testing.assert_close(hooked, expected, rtol=1e-6, atol=1e-6)
    handle.remove()
    with torch.no_grad():
        ff(x)
    assert len(pointwise_calls) == 1


def test_a_refused_fused_call_falls_back_to_the_plain_path_for_good(monkeypatch):
    def refusing(*args):
        raise RuntimeError("this oneDNN has no gelu post-op")

    monkeypatch.setattr(layers, "_linear_pointwise", refusing)
    torch.manual_seed(0)
    ff = FeedForward(32, 96, activation="gelu_tanh")
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(ff(x), ff.fc2(F.gelu(ff.fc1(x), approximate="tanh")), rtol=0, atol=0)
    assert layers._linear_pointwise is None


def perturbed(model, seed=0):
    """Randomise the zero-initialised outputs, so the cross-attention's result reaches the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def denoiser(kind):
    torch.manual_seed(0)
    if kind == "dit":
        return perturbed(DiT(DiTConfig(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                                       context_dim=CTX)))
    return perturbed(UNet(UNetConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                                     num_heads=2, context_dim=CTX, norm_groups=4)))


def count_kv_projections(model):
    """A list that gets one entry per to_kv call of any cross-attention of the model."""
    calls = []
    cross = [m for m in model.modules() if isinstance(m, Attention) and m.is_cross]
    assert cross
    for m in cross:
        m.to_kv.register_forward_hook(lambda *_: calls.append(1))
    return calls, len(cross)


def text(seed, b=2, t_len=5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t_len, dtype=torch.bool)
    mask[0, 3:] = False
    return torch.randn(b, t_len, CTX, generator=g), mask


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_text_keys_values_are_projected_once_per_text(kind):
    model = denoiser(kind)
    calls, n_cross = count_kv_projections(model)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 900])
    ctx, mask = text(2)
    other, _ = text(3)
    with torch.no_grad():
        plain = [model(x, t, c, mask) for c in (ctx, other)]
        assert len(calls) == 2 * n_cross
        calls.clear()
        with reuse_text_keys_values(model):
            steps = [model(x, t, ctx, mask), model(x * 0.5, t - 5, ctx, mask)]  # two sampler steps, one text
            assert len(calls) == n_cross
            switched = model(x, t, other, mask)  # another text tensor: projected anew, not the stale one
            assert len(calls) == 2 * n_cross
    assert torch.equal(steps[0], plain[0]) and torch.equal(switched, plain[1])
    assert not torch.equal(steps[1], steps[0])  # the second step really computed with its own x and t
    # Nothing kept after the block: no reference to the text, and the next call projects again.
    assert all(m._kv_cache is None for m in model.modules() if isinstance(m, Attention))
    with torch.no_grad():
        model(x, t, ctx, mask)
    assert len(calls) == 3 * n_cross


def test_cached_keys_values_follow_in_place_changes_and_autocast():
    """Inside the block: an in-place change to the text or to to_kv's weights, or another autocast state, must
    give a new projection (version counters and the autocast dtype are part of the cache entry)."""
    model = denoiser("dit")
    calls, n_cross = count_kv_projections(model)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    ctx, mask = text(2)
    cross = next(m for m in model.modules() if isinstance(m, Attention) and m.is_cross)
    with torch.no_grad(), reuse_text_keys_values(model):
        model(x, t, ctx, mask)
        model(x, t, ctx, mask)
        assert len(calls) == n_cross
        cross.to_kv.weight.mul_(2)  # e.g. load_state_dict or an EMA swap
        model(x, t, ctx, mask)
        assert len(calls) == 2 * n_cross - (n_cross - 1)  # only the changed module projects anew
        ctx.mul_(3)
        after_text = model(x, t, ctx, mask)
        assert len(calls) == 2 * n_cross + 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x, t, ctx, mask).dtype == torch.bfloat16
        assert len(calls) == 3 * n_cross + 1  # another autocast state: every module projects anew
        model(x, t, ctx, mask)  # back to float32: no bfloat16 keys reused against float32 queries
        assert len(calls) == 4 * n_cross + 1
    with torch.no_grad():  # what the cache gave after the changes is what a fresh projection gives
        assert torch.equal(after_text, model(x, t, ctx, mask))


def test_nothing_is_cached_while_autograd_records():
    """Inside the block but with autograd on (a training step), the projections stay in the graph."""
    model = denoiser("dit").train()
    calls, n_cross = count_kv_projections(model)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    ctx, mask = text(2)
    with reuse_text_keys_values(model):
        for _ in range(2):
            model.zero_grad()
            model(x, t, ctx, mask).square().mean().backward()
    assert len(calls) == 2 * n_cross
    assert all(m.to_kv.weight.grad.abs().sum() > 0 for m in model.modules() if isinstance(m, Attention) and m.is_cross)


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_prediction_depends_on_the_timestep(kind):
    """A denoiser blind to t (a zeroed time embedding) passed every shape and parity test of the layers."""
    model = denoiser(kind)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx, mask = text(2)
    with torch.no_grad():
        early, late = model(x, torch.tensor([10, 10]), ctx, mask), model(x, torch.tensor([900, 900]), ctx, mask)
    assert not torch.allclose(early, late, atol=1e-4)


def test_timestep_embedding_is_diffusers():
    """The sinusoidal embedding (DDPM's, after Vaswani et al. 2017), as diffusers computes it for SD and DiT."""
    from diffusers.models.embeddings import get_timestep_embedding

    from diffusion.models.layers import timestep_embedding

    t = torch.tensor([0, 1, 37, 500, 999])
    for dim in (16, 256):
        torch.testing.assert_close(timestep_embedding(t, dim),
                                   get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0))


def test_key_padding_mask_is_dropped_without_padding_and_an_empty_row_sees_every_key():
    """No padding -> None (SDPA may take its fast kernels); an all-padding row -> all keys (a fully masked row
    is NaN on the fused kernels); other rows unchanged."""
    from diffusion.models.layers import Attention, key_padding_mask_or_none

    assert key_padding_mask_or_none(torch.ones(2, 5, dtype=torch.bool)) is None
    assert key_padding_mask_or_none(None) is None
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert key_padding_mask_or_none(mask).tolist() == [[True, True, False], [True, True, True]]

    torch.manual_seed(0)
    attn = Attention(16, 2, context_dim=8).eval()
    x, ctx = torch.randn(2, 4, 16), torch.randn(2, 3, 8)
    with torch.no_grad():
        masked = attn(x, ctx, key_padding_mask=key_padding_mask_or_none(mask))
        unmasked = attn(x, ctx)
    torch.testing.assert_close(masked[1], unmasked[1])  # the empty row attends to every key
    assert not torch.allclose(masked[0], unmasked[0], atol=1e-4)  # the other row's padding is still masked
