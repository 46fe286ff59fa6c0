"""Tiny-config tests of the U-Net denoiser (shapes, gradients, text masking, checkpointing, config)."""

import pytest
import torch

from diffusion.config import ConfigError
from diffusion.models.layers import sincos_pos_embed_2d
from diffusion.models.unet import SpatialTransformer, UNet, UNetConfig

CTX = 16


def tiny_cfg(**kw):
    base = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                context_dim=CTX, norm_groups=4)
    return UNetConfig(**{**base, **kw})


def perturb_zeros(model, seed=0):
    """Give the zero-initialised tensors small random values, so every path carries signal and gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def inputs(b=2, h=8, w=8, t_len=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, h, w, generator=g)
    t = torch.tensor([3, 700][:b] + [10] * max(0, b - 2))
    ctx = torch.randn(b, t_len, CTX, generator=g)
    mask = torch.ones(b, t_len, dtype=torch.bool)
    mask[0, 3:] = False
    return x, t, ctx, mask


@pytest.mark.parametrize("hw", [(8, 8), (16, 16), (8, 16)])
def test_output_shape_matches_input(hw):
    torch.manual_seed(0)
    model = perturb_zeros(UNet(tiny_cfg()))
    x, t, ctx, mask = inputs(h=hw[0], w=hw[1])
    assert model(x, t, ctx, mask).shape == x.shape


def test_first_level_wider_than_base_channels():
    """channel_mult[0] != 1: conv_in, the first skip and the output head take the first level's width."""
    torch.manual_seed(0)
    model = perturb_zeros(UNet(tiny_cfg(base_channels=8, channel_mult=(2, 4))))
    assert model.conv_in.out_channels == model.norm_out.num_channels == 16
    x, t, ctx, mask = inputs()
    out = model(x, t, ctx, mask)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_output_is_exactly_zero_at_init():
    torch.manual_seed(0)
    out = UNet(tiny_cfg())(*inputs())
    assert torch.equal(out, torch.zeros_like(out))


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    model = perturb_zeros(UNet(tiny_cfg(attention_levels=(0, 1))))
    x, t, ctx, mask = inputs()
    pooled = torch.randn(2, CTX)
    loss = (model(x, t, ctx, mask, pooled=pooled) - torch.randn_like(x)).pow(2).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_padding_keys_are_ignored():
    torch.manual_seed(0)
    model = perturb_zeros(UNet(tiny_cfg())).eval()
    x, t, ctx, mask = inputs()
    pad = torch.randn(2, 4, CTX)
    ctx_padded = torch.cat([ctx, pad], dim=1)  # (B, T + 4, D)
    mask_padded = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        ref = model(x, t, ctx, mask)
        out = model(x, t, ctx_padded, mask_padded)
        unmasked = model(x, t, ctx_padded, None)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked, ref, atol=1e-4)  # the padding would matter if it were not masked


def test_all_true_mask_equals_no_mask():
    torch.manual_seed(0)
    model = perturb_zeros(UNet(tiny_cfg())).eval()
    x, t, ctx, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, ctx, torch.ones(2, 5, dtype=torch.bool)), model(x, t, ctx))


def test_gradient_checkpointing_matches(monkeypatch):
    import diffusion.models.unet as unet_module

    calls = []
    real = unet_module.checkpoint
    monkeypatch.setattr(unet_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    plain = perturb_zeros(UNet(tiny_cfg()))
    ckpt = UNet(tiny_cfg(gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx, mask = inputs()
    outs, used = [], []
    for model in (plain, ckpt):
        model.train()
        calls.clear()
        out = model(x, t, ctx, mask)
        out.pow(2).mean().backward()
        outs.append(out.detach())
        used.append(bool(calls))
    torch.testing.assert_close(outs[0], outs[1])
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert used == [False, True]  # the checkpointed path ran, and only where asked for


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = perturb_zeros(UNet(tiny_cfg())).eval()
    x, t, ctx, mask = inputs()
    with torch.no_grad():
        ref = model(x, t, ctx, mask)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t, ctx, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_head_dim_sets_heads_per_level():
    model = UNet(tiny_cfg(head_dim=8))
    assert model.down[-1].attn.block.attn1.num_heads == 32 // 8
    assert model.mid[0].attn.block.attn1.num_heads == 4


def test_indivisible_latent_raises():
    with pytest.raises(ValueError, match="divisible"):
        UNet(tiny_cfg())(*inputs(h=9, w=8))


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"norm_groups": 6}, "norm_groups"),
        ({"attention_levels": (2,)}, "attention_levels"),
        ({"num_heads": 3}, "num_heads"),
        ({"head_dim": 5}, "head_dim"),
        ({"channel_mult": ()}, "channel_mult"),
        ({"dropout": 1.5}, "dropout"),
        ({"base_channels": 6, "norm_groups": 2, "num_heads": 2, "position_embedding": True}, "position_embedding"),
    ],
)
def test_bad_config_names_key(changes, key):
    data = {**tiny_cfg().to_dict(), **changes}
    with pytest.raises(ConfigError, match=rf"model\.unet\.{key}"):
        UNetConfig.from_dict(data, "model.unet")


def test_position_embedding_adds_sincos_to_the_tokens():
    """With position_embedding the attention block sees proj_in(norm(x)) + the 2-D sin-cos grid, row-major."""
    torch.manual_seed(0)
    st = perturb_zeros(SpatialTransformer(16, 2, CTX, 4, 0.0, position_embedding=True))
    _, _, ctx, mask = inputs()
    x = torch.randn(2, 16, 4, 6)
    seen = {}
    st.block.register_forward_pre_hook(lambda m, args: seen.update(h=args[0]))  # returns None: args unchanged
    st(x, ctx, mask)
    tokens = st.proj_in(st.norm(x).permute(0, 2, 3, 1).reshape(2, 24, 16))
    torch.testing.assert_close(seen["h"], tokens + sincos_pos_embed_2d(16, 4, 6)[None])


def test_position_embedding_adds_no_parameters_and_changes_the_output():
    def build(pos):
        torch.manual_seed(0)
        return perturb_zeros(UNet(tiny_cfg(position_embedding=pos)))

    plain, with_pos = build(False), build(True)
    assert plain.state_dict().keys() == with_pos.state_dict().keys()  # checkpoints load either way
    with_pos.load_state_dict(plain.state_dict())
    x, t, ctx, mask = inputs()
    assert not torch.allclose(plain(x, t, ctx, mask), with_pos(x, t, ctx, mask), atol=1e-4)
    # Fixed positions, computed for whatever grid comes in: a wider latent works with the same weights.
    assert with_pos(inputs(h=8, w=16)[0], t, ctx, mask).shape == (2, 4, 8, 16)


@pytest.mark.parametrize("in_ch, out_ch", [(8, 16), (16, 16)])
def test_resblock_is_diffusers_scale_shift_resnet_block(in_ch, out_ch):
    """ResBlock = diffusers' ResnetBlock2D(time_embedding_norm="scale_shift"): GN-SiLU-conv, SiLU(emb) ->
    Linear -> (scale, shift), norm2(h) * (1 + scale) + shift, SiLU, conv, plus the (1x1) skip."""
    from diffusers.models.resnet import ResnetBlock2D

    from diffusion.models.unet import ResBlock

    torch.manual_seed(0)
    ours = ResBlock(in_ch, out_ch, emb_dim=12, groups=4, dropout=0.0).eval()
    with torch.no_grad():
        ours.conv2.weight.normal_(0, 0.05)  # zero-initialised: give it values so the branch matters
        ours.conv2.bias.normal_(0, 0.05)
    ref = ResnetBlock2D(in_channels=in_ch, out_channels=out_ch, temb_channels=12, groups=4, eps=1e-5,
                        time_embedding_norm="scale_shift").eval()
    pairs = [("norm1", "norm1"), ("conv1", "conv1"), ("emb_proj", "time_emb_proj"), ("norm2", "norm2"),
             ("conv2", "conv2")] + ([("skip", "conv_shortcut")] if in_ch != out_ch else [])
    with torch.no_grad():
        for a, b in pairs:
            getattr(ref, b).load_state_dict(getattr(ours, a).state_dict())
    x, emb = torch.randn(2, in_ch, 8, 8), torch.randn(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, emb), ref(x, emb), rtol=1e-5, atol=1e-5)


def test_spatial_transformer_and_resblock_start_as_the_identity():
    """Zero proj_out / conv2 and a residual around each: a fresh SpatialTransformer returns its input exactly,
    a fresh ResBlock its skip (guided-diffusion, LDM)."""

    from diffusion.models.unet import ResBlock, SpatialTransformer

    torch.manual_seed(0)
    _, _, ctx, mask = inputs()
    x = torch.randn(2, 16, 4, 4)
    st = SpatialTransformer(16, 2, CTX, 4, 0.0)
    res = ResBlock(16, 32, emb_dim=8, groups=4, dropout=0.0)
    with torch.no_grad():
        assert torch.equal(st(x, ctx, mask), x)
        torch.testing.assert_close(res(x, torch.randn(2, 8)), res.skip(x))


def test_unet_gradients_equal_finite_differences():
    """Autograd through every path (skips included) equals the numerical directional derivative: a skip
    detached from the graph passed the gradient-reaches-every-parameter test."""

    from diffusion.models.unet import UNet

    torch.manual_seed(0)
    model = perturb_zeros(UNet(tiny_cfg(attention_levels=(0, 1)))).double().eval()
    x, t, ctx, mask = inputs()
    x, ctx = x.double().requires_grad_(), ctx.double()
    w = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def loss(inp):
        return (model(inp, t, ctx, mask) * w).sum()

    (grad,) = torch.autograd.grad(loss(x), x)
    eps = 1e-6
    with torch.no_grad():
        numeric = (loss(x + eps * v) - loss(x - eps * v)) / (2 * eps)
    assert float((grad * v).sum()) == pytest.approx(float(numeric), rel=1e-5)
