"""Tiny-config tests of the DiT denoiser (shapes, gradients, text masking, checkpointing, presets)."""

import pytest
import torch

from diffusion.config import ConfigError
from diffusion.models.dit import DIT_PRESETS, DiT, DiTConfig
from diffusion.models.layers import sincos_pos_embed_2d

CTX = 16


def tiny_cfg(**kw):
    base = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, context_dim=CTX)
    return DiTConfig(**{**base, **kw})


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


@pytest.mark.parametrize("hw", [(8, 8), (16, 16), (8, 12)])
@pytest.mark.parametrize("adaln_single", [False, True])
def test_output_shape_matches_input(hw, adaln_single):
    model = perturb_zeros(DiT(tiny_cfg(adaln_single=adaln_single)))
    x, t, ctx, mask = inputs(h=hw[0], w=hw[1])
    assert model(x, t, ctx, mask).shape == x.shape


def test_learn_sigma_doubles_channels():
    x, t, ctx, mask = inputs()
    assert DiT(tiny_cfg(learn_sigma=True))(x, t, ctx, mask).shape == (2, 8, 8, 8)


@pytest.mark.parametrize("adaln_single", [False, True])
def test_output_is_exactly_zero_at_init(adaln_single):
    torch.manual_seed(0)
    out = DiT(tiny_cfg(adaln_single=adaln_single))(*inputs())
    assert torch.equal(out, torch.zeros_like(out))


def test_every_block_gets_a_contiguous_residual_stream():
    # The patch embedding's transposed view must not set the residual stream's layout: with it, every
    # LayerNorm copied its input and kept the copy for backward (12% more training memory).
    model = perturb_zeros(DiT(tiny_cfg(depth=3)))
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda mod, args, out: seen.append((args[0].is_contiguous(), out.is_contiguous())))
    model(*inputs())
    assert seen == [(True, True)] * 3


@pytest.mark.parametrize("patch_size", [2, 4])
def test_patchify_is_the_strided_convolution(patch_size):
    # patchify computes x_embedder (DiT's p x p conv, stride p) as a linear map of each flattened patch: same
    # tokens, in the same order, and the same gradients, on a non-square grid.
    torch.manual_seed(0)
    model = DiT(tiny_cfg(patch_size=patch_size, input_size=8))
    x = torch.randn(2, 4, 2 * patch_size, 3 * patch_size)
    ours = model.patchify(x, 2, 3)
    ref = model.x_embedder(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(ours, ref)
    assert ours.is_contiguous()
    grad = torch.randn_like(ref)
    g_ours = torch.autograd.grad(ours, model.x_embedder.weight, grad)[0]
    g_ref = torch.autograd.grad(model.x_embedder(x).flatten(2).transpose(1, 2), model.x_embedder.weight, grad)[0]
    torch.testing.assert_close(g_ours, g_ref)


@pytest.mark.parametrize("adaln_single", [False, True])
def test_gradient_reaches_every_parameter(adaln_single):
    torch.manual_seed(0)
    model = perturb_zeros(DiT(tiny_cfg(adaln_single=adaln_single)))
    x, t, ctx, mask = inputs()
    loss = (model(x, t, ctx, mask) - torch.randn_like(x)).pow(2).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_padding_keys_are_ignored():
    torch.manual_seed(0)
    model = perturb_zeros(DiT(tiny_cfg())).eval()
    x, t, ctx, mask = inputs()
    ctx_padded = torch.cat([ctx, torch.randn(2, 4, CTX)], dim=1)  # (B, T + 4, D)
    mask_padded = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        ref = model(x, t, ctx, mask)  # pooled=None: the masked mean, also blind to padding
        out = model(x, t, ctx_padded, mask_padded)
        unmasked = model(x, t, ctx_padded, None)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked, ref, atol=1e-4)


def test_pooled_default_is_masked_mean():
    torch.manual_seed(0)
    model = perturb_zeros(DiT(tiny_cfg())).eval()
    x, t, ctx, mask = inputs()
    pooled = torch.stack([ctx[0, :3].mean(0), ctx[1].mean(0)])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, ctx, mask), model(x, t, ctx, mask, pooled=pooled))


def test_gradient_checkpointing_matches(monkeypatch):
    import diffusion.models.dit as dit_module

    calls = []
    real = dit_module.checkpoint
    monkeypatch.setattr(dit_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    plain = perturb_zeros(DiT(tiny_cfg()))
    ckpt = DiT(tiny_cfg(gradient_checkpointing=True))
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


def test_exact_gelu_is_the_tanh_form_within_its_approximation_error():
    """mlp_activation 'gelu' (exact, faster on a CPU) and 'gelu_tanh' (DiT's) share weights and state dict, and
    differ only by the tanh approximation (at most 5e-4 per activation): the same network, not another one."""
    tanh = perturb_zeros(DiT(tiny_cfg()))
    exact = DiT(tiny_cfg(mlp_activation="gelu"))
    exact.load_state_dict(tanh.state_dict())
    assert [type(b.mlp).__name__ for b in exact.blocks] == ["FeedForward"] * 2
    assert {b.mlp.activation for b in exact.blocks} == {"gelu"} and {b.mlp.activation for b in tanh.blocks} == {"gelu_tanh"}
    with torch.no_grad():
        a, b = tanh(*inputs()), exact(*inputs())
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-3 * a.abs().max().item())


def test_pos_embed_matches_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ref = get_2d_sincos_pos_embed(32, 6, base_size=6, output_type="pt")  # (36, 32)
    torch.testing.assert_close(sincos_pos_embed_2d(32, 6, 6), ref.float())


def test_pos_embed_follows_grid_size():
    model = DiT(tiny_cfg())
    assert model.pos_embed(4, 6, torch.device("cpu"), torch.float32).shape == (1, 24, 32)
    assert model.pos_embed(4, 6, torch.device("cpu"), torch.float32) is model.pos_embed(
        4, 6, torch.device("cpu"), torch.float32
    )  # cached


def test_indivisible_latent_raises():
    with pytest.raises(ValueError, match="patch_size"):
        DiT(tiny_cfg())(*inputs(h=9, w=8))


def test_presets_are_the_paper_sizes():
    assert len(DIT_PRESETS) == 12
    assert DIT_PRESETS["DiT-S/2"] == {"depth": 12, "hidden_size": 384, "num_heads": 6, "patch_size": 2}
    assert DIT_PRESETS["DiT-XL/8"] == {"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 8}
    assert DIT_PRESETS["DiT-L/4"]["depth"] == 24 and DIT_PRESETS["DiT-B/4"]["hidden_size"] == 768


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-S/4", "DiT-S/8", "DiT-B/2", "DiT-B/4", "DiT-B/8"])
def test_presets_build_at_tiny_depth(name):
    cfg = DiTConfig.from_preset(name, depth=1, input_size=16, context_dim=CTX)
    assert (cfg.hidden_size, cfg.num_heads, cfg.patch_size) == tuple(
        DIT_PRESETS[name][k] for k in ("hidden_size", "num_heads", "patch_size")
    )
    model = DiT(cfg)
    assert len(model.blocks) == 1
    x, t, ctx, mask = inputs(h=16, w=16)
    with torch.no_grad():
        assert model(x, t, ctx, mask).shape == x.shape


def test_large_presets_parse():
    for name in DIT_PRESETS:
        assert DiTConfig.from_preset(name).depth == DIT_PRESETS[name]["depth"]


def test_unknown_preset_lists_names():
    with pytest.raises(ConfigError, match=r"preset.*DiT-S/2.*DiT-XL/8"):
        DiTConfig.from_preset("DiT-M/2")


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"input_size": 9}, "patch_size"),  # 2 does not divide the side: the patch is what to change
        ({"num_heads": 3}, "num_heads"),
        ({"hidden_size": 6, "num_heads": 2}, "hidden_size"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
        ({"depth": 0}, "depth"),
        ({"mlp_activation": "relu"}, "mlp_activation"),
    ],
)
def test_bad_config_names_key(changes, key):
    data = {**tiny_cfg().to_dict(), **changes}
    with pytest.raises(ConfigError, match=rf"model\.dit\.{key}"):
        DiTConfig.from_dict(data, "model.dit")


@pytest.mark.parametrize("gh, gw", [(3, 3), (2, 3)])
def test_unpatchify_puts_each_token_back_at_its_grid_cell(gh, gw):
    """Tokens in patchify's order (row-major grid, then DiT's (p, q, C) inside a patch) come back as the image."""

    from diffusion.models.dit import DiT

    model = DiT(tiny_cfg(patch_size=2))
    p, c = 2, model.cfg.out_channels
    x = torch.randn(2, c, gh * p, gw * p)
    tokens = x.reshape(2, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(2, gh * gw, p * p * c)
    assert torch.equal(model.unpatchify(tokens, gh, gw), x)


def test_tokens_get_the_positions_of_their_grid_cells():
    """On a non-square latent the first block sees patchify(x) + the (gh, gw) sin-cos grid, not (gw, gh)'s."""

    from diffusion.models.dit import DiT
    from diffusion.models.layers import sincos_pos_embed_2d

    model = perturb_zeros(DiT(tiny_cfg())).eval()
    x, t, ctx, mask = inputs(h=8, w=12)  # patch 2: a 4 x 6 grid
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(h=args[0]))
    with torch.no_grad():
        model(x, t, ctx, mask)
        expected = model.patchify(x, 4, 6) + sincos_pos_embed_2d(32, 4, 6)[None]
    torch.testing.assert_close(seen["h"], expected)


@pytest.mark.parametrize("adaln_single", [False, True])
def test_every_dit_block_is_the_identity_at_init(adaln_single):
    """adaLN-Zero (DiT sec. 3.2): the gates start at zero, so each block starts as the identity; an ungated
    attention branch passed every DiT test (the zero final layer hides it)."""

    from diffusion.models.dit import DiT

    torch.manual_seed(0)
    model = DiT(tiny_cfg(adaln_single=adaln_single, depth=3)).eval()
    pairs = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: pairs.append((args[0], out)))
    with torch.no_grad():
        model(*inputs())
    assert len(pairs) == 3 and all(torch.equal(a, b) for a, b in pairs)
