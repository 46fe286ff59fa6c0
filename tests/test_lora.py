"""LoRA fine-tuning (`train.lora`, models/lora.py): the model in train.init_from stays frozen, low-rank adapters on
the targeted layers train, and the exported model has them merged in, an ordinary model.

The stage tests start from test_init_from's trained tiny DiT (its `trained` fixture).
"""

import copy
import json

import pytest
import torch
from conftest import run_cli
from test_init_from import QUICK, _state, trained  # noqa: F401 (trained: a fixture)
from test_train_stage import copy_project, rank_lines, runs, train_in_process, upstream  # noqa: F401 (a fixture)
from torch import nn

from diffusion.models import lora
from diffusion.models.dit import DiT, DiTConfig
from diffusion.models.lora import LoRALinear, inject_lora, merge_lora
from diffusion.models.unet import UNet, UNetConfig
from diffusion.stage_configs import LoRAConfig

TARGETS = LoRAConfig().targets  # the attention projections


def _trained(net: nn.Module) -> nn.Module:
    """`net` with a trained model's kind of weights: DiT's zero-initialised gates and output (and the U-Net's
    zero-initialised output convolutions) would hide any change."""
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.1)
    return net


def _dit() -> DiT:
    torch.manual_seed(0)
    return _trained(DiT(DiTConfig(in_channels=4, context_dim=16, depth=2, hidden_size=32, num_heads=2, patch_size=2)))


def _unet() -> UNet:
    torch.manual_seed(0)
    return _trained(UNet(UNetConfig(in_channels=4, context_dim=16, base_channels=16, channel_mult=(1, 2),
                                    num_res_blocks=1, attention_levels=(1,), num_heads=2, norm_groups=4)))


def _adapted_dit() -> tuple[DiT, DiT]:
    """A DiT and a copy of it with rank-2 adapters on its attention, their B made non-zero (as if trained)."""
    base = _dit()
    adapted = copy.deepcopy(base)
    inject_lora(adapted, TARGETS, rank=2, alpha=3.0)
    with torch.no_grad():
        for layer in lora.adapted_layers(adapted).values():
            layer.lora_up.weight.normal_(0.0, 0.1)
    return base, adapted


def _dit_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), torch.randn(2, 5, 16, generator=g))


def test_an_adapter_starts_as_its_layer_and_merges_into_the_same_function():
    """B = 0: the adapted layer computes its base's function exactly, sharing its weight; with any B, the merged
    plain nn.Linear computes what the adapted one does, in one product."""
    torch.manual_seed(0)
    base, x = nn.Linear(12, 9), torch.randn(4, 12)
    layer = LoRALinear.from_linear(base, rank=3, alpha=6.0)
    assert torch.equal(layer(x), base(x)) and layer.weight.data_ptr() == base.weight.data_ptr()
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_down.weight", "lora_up.weight"]
    nn.init.normal_(layer.lora_up.weight)
    merged = layer.merged()
    assert type(merged) is nn.Linear
    expected = base(x) + 2.0 * x @ layer.lora_down.weight.T @ layer.lora_up.weight.T  # alpha / rank = 2
    assert torch.allclose(layer(x), expected, atol=1e-5) and torch.allclose(merged(x), expected, atol=1e-5)
    assert not torch.allclose(merged(x), base(x), atol=1e-3)


@pytest.mark.parametrize("make, layers", [
    (_dit, 2 * 5),  # per block: self-attention to_qkv and out, cross-attention to_q, to_kv and out
    (_unet, 4 * 5),  # the same in each spatial transformer: level 1 down, the middle, level 1 up (two blocks)
])
def test_adapting_a_denoiser_trains_the_adapters_alone_and_merging_restores_its_state_dict(make, layers):
    dit, inputs = make(), _dit_inputs()
    keys, before = dit.state_dict().keys(), dit(*inputs)
    names = inject_lora(dit, TARGETS, rank=2, alpha=2.0)
    assert len(names) == layers and all(n.rsplit(".", 1)[-1] in TARGETS for n in names)
    assert torch.equal(dit(*inputs), before)  # B = 0
    trainable = {n for n, p in dit.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{d}.weight" for n in names for d in ("down", "up")}
    assert lora.lora_parameter_count(dit) == sum(2 * (m.in_features + m.out_features) for m in dit.modules()
                                            if isinstance(m, LoRALinear))
    dit(*inputs).square().mean().backward()
    assert all(p.grad is not None and p.grad.any() for n, p in dit.named_parameters() if n in trainable
               and "lora_up" in n)  # A's gradient is B^T (...): zero while B = 0
    assert all(p.grad is None for n, p in dit.named_parameters() if n not in trainable)

    for m in dit.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_up.weight, std=0.1)
    adapted = dit(*inputs).detach()
    merge_lora(dit)
    assert dit.state_dict().keys() == keys and not any(isinstance(m, LoRALinear) for m in dit.modules())
    assert torch.allclose(dit(*inputs), adapted, atol=1e-5) and not torch.allclose(adapted, before, atol=1e-3)


def test_targets_match_by_the_end_of_a_name_and_an_unmatched_list_names_the_layers():
    dit = _dit()
    assert inject_lora(dit, ("fc1", "adaLN_modulation.1"), rank=1, alpha=1.0) == [
        *(f"blocks.{i}.{n}" for i in range(2) for n in ("mlp.fc1", "adaLN_modulation.1")),
        "final_layer.adaLN_modulation.1"]
    # The DiT's own MLP path fuses fc1 with its GELU on a CPU only for a plain nn.Linear: adapted, it still runs.
    assert dit(*_dit_inputs()).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"no nn.Linear layer of the DiT matches \['to_k'\]; its layers are .*"
                                         r"attn.to_qkv, .*mlp.fc1"):
        inject_lora(_dit(), ("to_k",), rank=1, alpha=1.0)


@pytest.fixture
def project(trained, tmp_path):  # noqa: F811
    return copy_project(trained, tmp_path)


def _denoiser_targets(state: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in state if k.startswith("denoiser.") and any(f".{t}." in k for t in TARGETS)}


def test_lora_fine_tuning_trains_the_adapters_and_exports_an_ordinary_model(project, capsys):
    """The text encoder and every untargeted weight are exported as the model had them, to the bit; the targeted
    layers changed by the merged adapters; the model folder has the model's keys and loads as any other."""
    from diffusion.models import LatentDiffusionModel

    pretrained, out = project / "models/pretrained", project / "models/diffusion"
    train_in_process(project, "train.max_steps=3", "train.lr=3e-2", "train.warmup_steps=0", *QUICK,
                     f"train.init_from={pretrained}", "train.lora.rank=2")
    printed = capsys.readouterr().out
    assert "train: LoRA rank 2 on 10 layers:" in printed
    old, new = (torch.load(f / "model.pt", weights_only=True) for f in (pretrained, out))
    assert new.keys() == old.keys()
    targets = _denoiser_targets(old)
    assert targets and all(torch.equal(new[k], old[k]) for k in old if k not in targets)
    changed = {k for k in targets if not torch.equal(new[k], old[k])}
    assert changed and all(k.endswith(".weight") for k in changed)  # the biases are frozen too
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert f"{metrics['parameters_trained']:,} trainable parameters" in printed
    assert metrics["parameters_trained"] < 0.2 * metrics["parameters_denoiser"]
    assert runs("train")[1][0].data.params["lora.rank"] == "2"
    model = LatentDiffusionModel.from_pretrained(out)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())

    # Beside it, the adapters alone: merged into the model they were trained on, they give the export to the bit.
    from diffusion.pipeline_model import TextToImagePipeline

    adapters = lora.read_adapters(out / lora.ADAPTER_FILE)
    assert (adapters["rank"], adapters["alpha"], adapters["base"], len(adapters["layers"])) == (2, 2.0, str(pretrained),
                                                                                                10)
    assert sum(v.numel() for v in adapters["weights"].values()) == metrics["parameters_trained"]
    pipe = TextToImagePipeline.from_pretrained(pretrained, device="cpu")
    pipe.load_lora_weights(out)
    assert all(torch.equal(v, new[k]) for k, v in pipe.model.state_dict().items())
    client, (run, *_) = runs("train")
    assert "model/lora.pt" in [f.path for f in client.list_artifacts(run.info.run_id, "model")]

    # With lora.text_encoder, its attention is adapted too.
    train_in_process(project, "train.max_steps=3", "train.lr=3e-2", "train.warmup_steps=0", *QUICK,
                     f"train.init_from={pretrained}", "train.lora.rank=2", "train.lora.text_encoder=true")
    text = _state(out, "text_encoder")
    assert any(not torch.equal(v, old[k]) for k, v in text.items() if ".attn." in k)
    assert all(torch.equal(v, old[k]) for k, v in text.items() if ".attn." not in k)


def test_a_lora_run_resumes_from_its_checkpoint(project, capsys):
    """The checkpoint holds the adapters: a rerun of the finished run resumes it and exports the same model."""
    args = ("train.max_steps=2", "train.lr=3e-2", "train.warmup_steps=0", "train.checkpoint_every_n_steps=1", *QUICK,
            f"train.init_from={project / 'models/pretrained'}", "train.lora.rank=2")
    train_in_process(project, *args)
    first = (project / "models/diffusion/model.pt").read_bytes()
    train_in_process(project, *args)
    assert "train: resuming from" in capsys.readouterr().out
    assert (project / "models/diffusion/model.pt").read_bytes() == first


@pytest.mark.timeout(300)
def test_lora_under_ddp_ends_with_the_same_weights_on_both_ranks(project, cli_env):
    """The frozen weights take no part in DDP's gradient reduction; the adapters' gradients are averaged, so both
    ranks end with the same weights (their digests), and rank 0 exports the merged model."""
    pretrained = project / "models/pretrained"
    out = run_cli(["train", *(a for o in (*QUICK, "train.devices=2", "train.strategy=ddp", "train.max_steps=3",
                                          "train.lr=3e-2", f"train.init_from={pretrained}", "train.lora.rank=2")
                              for a in ("-S", o))], project, cli_env)
    ranks = sorted(rank_lines(out.stdout))
    assert [r[:2] for r in ranks] == [(0, 3), (1, 3)] and ranks[0][2] == ranks[1][2], out.stdout
    new, old = (torch.load(f / "model.pt", weights_only=True) for f in (project / "models/diffusion", pretrained))
    assert new.keys() == old.keys() and any(not torch.equal(new[k], old[k]) for k in _denoiser_targets(old))


@pytest.mark.parametrize("overrides, message", [
    (["train.lora.rank=2"], r"train.lora.rank: LoRA adapts a trained model, and train.init_from is null"),
    (["train.lora.rank=2", "train.lora.targets=[to_k, to_v]", "INIT"],
     (r"train.lora.targets: \['to_k', 'to_v'\] name no layer of the denoiser \(DiT\); its nn.Linear layers are "
      r".*attn.to_qkv")),
    (["train.lora.rank=2", "train.lora.targets=[adaLN_modulation.1]", "train.lora.text_encoder=true", "INIT"],
     r"name no layer of the text_encoder \(TextEncoder\)"),
    # A typo beside a good name: refused too, not trained around.
    (["train.lora.rank=2", "train.lora.targets=[to_q, to_k]", "INIT"],
     r"train.lora.targets: 'to_k' name\(s\) no layer of the denoiser; the denoiser's nn.Linear layers are .*to_qkv"),
])
def test_bad_lora_settings_are_refused_before_the_run(project, overrides, message):
    from diffusion.config import ConfigError

    overrides = [f"train.init_from={project / 'models/pretrained'}" if o == "INIT" else o for o in overrides]
    with pytest.raises(ConfigError, match=message):
        train_in_process(project, *QUICK, *overrides)
    assert not runs("train")[1] and not (project / "checkpoints/train").exists()


def test_the_adapters_file_merges_into_its_base_at_any_scale(tmp_path):
    """lora.pt holds A and B alone; merged into the base at scale 1 it gives merge_lora's weights to the bit, at 0
    the base's, at 0.5 half the update; the file says its rank, alpha and base."""
    base, adapted = _adapted_dit()
    path = lora.save_adapters(adapted, tmp_path / "lora.pt", base="models/pretrained")
    adapters = lora.read_adapters(tmp_path)  # the folder holding it will do
    assert (adapters["rank"], adapters["alpha"], adapters["base"]) == (2, 3.0, "models/pretrained")
    assert len(adapters["weights"]) == 2 * len(adapters["layers"]) == 2 * len(lora.adapted_layers(adapted))
    assert path.stat().st_size < 0.2 * sum(p.numel() * 4 for p in base.parameters())
    merged = merge_lora(copy.deepcopy(adapted)).state_dict()
    scaled = {}
    for scale in (1.0, 0.0, 0.5):
        net = copy.deepcopy(base)
        assert lora.apply_adapters(net, adapters, scale) is None  # its base: no warning
        scaled[scale] = net.state_dict()
    assert all(torch.equal(v, merged[k]) for k, v in scaled[1.0].items())
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in scaled[0.0].items())
    name = adapters["layers"][0] + ".weight"
    half = (scaled[1.0][name] - scaled[0.0][name]) / 2
    assert torch.allclose(scaled[0.5][name] - scaled[0.0][name], half, atol=1e-6) and half.abs().max() > 1e-3


def test_adapters_that_do_not_fit_are_refused_before_any_weight_changes(tmp_path):
    """Another architecture: refused naming the layer, the model untouched. Another model of the same shapes, or
    the model they are merged into already: merged, with a warning. Not an adapters' file: named."""
    base, adapted = _adapted_dit()
    adapters = lora.read_adapters(lora.save_adapters(adapted, tmp_path / "lora.pt", base="models/pretrained"))
    unet = _unet()
    before = copy.deepcopy(unet.state_dict())
    with pytest.raises(ValueError, match=r"lora.pt: adapts blocks.0.attn.out, which this UNet has no plain "
                                         r"nn.Linear layer for"):
        lora.apply_adapters(unet, adapters)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    torch.manual_seed(0)
    wider = DiT(DiTConfig(in_channels=4, context_dim=16, depth=2, hidden_size=64, num_heads=2, patch_size=2))
    with pytest.raises(ValueError, match=r"the adapter of blocks.0.attn.out is for a \(32, 32\) weight; this "
                                         r"model's is \(64, 64\)"):
        lora.apply_adapters(wider, adapters)
    merged = merge_lora(copy.deepcopy(adapted))
    assert "not those of models/pretrained, which the adapters were trained on" in lora.apply_adapters(merged,
                                                                                                       adapters)
    with pytest.raises(ValueError, match=r"scale: expected a finite number, got nan"):
        lora.apply_adapters(copy.deepcopy(base), adapters, float("nan"))
    torch.save({**{k: v for k, v in torch.load(tmp_path / "lora.pt", weights_only=True).items()}, "weights": {}},
               tmp_path / "empty.pt")
    with pytest.raises(ValueError, match=r"empty.pt: holds no adapter"):
        lora.read_adapters(tmp_path / "empty.pt")
    torch.save(base.state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"model.pt: not an adapters' file"):
        lora.read_adapters(tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match=r"nothing: no such file; expected the lora.pt"):
        lora.read_adapters(tmp_path / "nothing")


def test_sample_and_merge_lora_use_a_runs_adapters(project, cli_env):
    """`sample --lora` merges the adapters into their base (the run's init_from) and draws what the run's exported
    model draws; `merge-lora --scale` (here from the run's MLflow artifact) writes a model folder between the two,
    which samples as any other; merging the adapters into a model that has them already, a scale that is not a
    number and a base that is not a model folder are refused before anything is written."""
    import numpy as np
    from PIL import Image

    pretrained, out = project / "models/pretrained", project / "models/diffusion"
    train_in_process(project, "train.max_steps=3", "train.lr=3e-2", "train.warmup_steps=0", *QUICK,
                     f"train.init_from={pretrained}", "train.lora.rank=2")
    sample = ["sample", "a red circle", "--steps", "2", "--device", "cpu"]
    proc = run_cli([*sample, "--lora", str(out / "lora.pt"), "--out", "lora.png"], project, cli_env)
    assert f"LoRA {out / 'lora.pt'} at scale 1" in proc.stdout and "warning" not in proc.stderr
    run_cli([*sample, "--model", str(out), "--out", "merged.png"], project, cli_env)
    run_cli([*sample, "--model", str(pretrained), "--out", "base.png"], project, cli_env)
    lora_png, merged_png, base_png = (np.asarray(Image.open(project / f"{n}.png")) for n in ("lora", "merged", "base"))
    assert np.array_equal(lora_png, merged_png) and not np.array_equal(lora_png, base_png)

    uri = f"runs:/{runs('train')[1][0].info.run_id}/model/lora.pt"
    proc = run_cli(["merge-lora", uri, "--scale", "0.5", "--out", "models/half"], project, cli_env)
    assert f"merge-lora: 10 adapted layers (rank 2) of {uri} merged into {pretrained} at scale 0.5" in proc.stdout
    half, base, full = (torch.load(f / "model.pt", weights_only=True) for f in (project / "models/half", pretrained,
                                                                                  out))
    changed = [k for k in base if not torch.equal(base[k], full[k])]
    assert changed and all(torch.allclose(half[k], (base[k] + full[k]) / 2, atol=1e-6) for k in changed)
    record = json.loads((project / "models/half/train_config.json").read_text())["merged_lora"]
    assert (record["lora"], record["scale"]) == (uri, 0.5)
    proc = run_cli([*sample, "--model", "models/half", "--lora-scale", "0.5", "--out", "half.png"], project, cli_env)
    assert "warning: --lora-scale 0.5 has no effect without --lora" in proc.stderr

    # Refused, exit 2: the adapters into their run's own model or merge-lora's, which hold them already; nan; -S.
    for args, message in (([*sample, "--model", str(out), "--lora", str(out)], "merged into the model in"),
                          ([*sample, "--model", "models/half", "--lora", str(out)], "merged into the model in"),
                          ([*sample, "--lora", str(out), "--lora-scale", "nan"], "--lora-scale: expected a finite"),
                          ([*sample, "--lora", str(out), "-S", "train.lr=1"], "not with --lora"),
                          (["merge-lora", str(out), "--model", str(out), "--out", "models/bad"], "would add them twice"),
                          (["merge-lora", str(out), "--scale", "inf", "--out", "models/bad"], "--scale: expected a")):
        proc = run_cli([*args, "--out", "bad.png"] if args[0] == "sample" else args, project, cli_env, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    proc = run_cli(["merge-lora", str(out), "--model", "models/half/model.pt", "--out", "models/bad"], project,
                   cli_env, check=False)
    assert proc.returncode == 1 and "--model " in proc.stderr, proc.stderr
    assert not (project / "models/bad").exists() and not (project / "bad.png").exists()
