"""Layer (a) of STYLE.md 15: params.yaml parses into its configs; bad values are refused by name."""

import re
from pathlib import Path

import pytest
import yaml

from diffusion.config import ConfigError

from diffusion.params import apply_overrides, load_params, load_section, parse_override
from diffusion.data_configs import ShardConfig, ShapesConfig
from diffusion.stage_configs import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_parses_every_section():
    from diffusion.stage_configs import STAGE_CONFIGS, check_every_section

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(STAGE_CONFIGS) <= set(params), "every stage has its section in params.yaml"
    for section, cls in STAGE_CONFIGS.items():  # raises ConfigError on an unknown key or a bad value
        assert cls.from_dict(params[section], section).section == section
    check_every_section(ROOT / "params.yaml")  # with the profile mechanism as the stages load them
    cfg = ShardConfig.from_dict(params["shard"])
    assert cfg.source == "shapes"
    assert isinstance(cfg.shapes, ShapesConfig)
    assert cfg.shapes.holdout == tuple(params["shard"]["shapes"]["holdout"])


def test_round_trip_through_plain_data():
    cfg = load_section(ShardConfig, ROOT / "params.yaml")
    assert ShardConfig.from_dict(cfg.to_dict()) == cfg


def test_configs_are_frozen():
    cfg = ShardConfig()
    with pytest.raises(AttributeError):
        cfg.resolution = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "data, key",
    [
        ({"colour_depth": 8}, "shard.colour_depth"),
        ({"resolution": "big"}, "shard.resolution"),
        ({"resolution": 2}, "shard.resolution"),
        ({"resolution": 64.5}, "shard.resolution"),
        ({"source": "imagenet"}, "shard.source"),
        ({"shapes": {"num_train": -5}}, "shard.shapes.num_train"),
        ({"shapes": {"level": 3}}, "shard.shapes.level"),
        ({"shapes": {"holdout": "purple triangle"}}, "shard.shapes.holdout"),
        ({"val_fraction": 1.0}, "shard.val_fraction"),
        ({"image_format": True}, "shard.image_format"),
        ({"source": "folder"}, "shard.path"),
        ({"caption_template": "a photo"}, "shard.caption_template"),
    ],
)
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        ShardConfig.from_dict(data, "shard")
    assert key in str(err.value)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"scheduler": {"prediction_type": "epsilon"}, "min_snr_gamma": 5.0, "min_snr_on": "snr_plus_one"}, "min_snr_on"),
        ({"denoising_type": "dit", "dit": {"learn_sigma": True}}, "dit.learn_sigma"),
        ({"scheduler": {"prediction_type": "epsilon", "rescale_zero_terminal_snr": True}}, "rescale_zero_terminal_snr"),
        ({"scheduler": {"num_timesteps": 100}, "sample_steps": 101}, "sample_steps"),
        ({"strategy": "fsdp"}, "train.strategy"),  # the EMA cannot average sharded weights
    ],
)
def test_train_combinations_its_loss_cannot_train_are_rejected(overrides, key):
    with pytest.raises(ConfigError, match=key):
        TrainConfig.from_dict(overrides, "train")
    TrainConfig.from_dict({}, "train")  # the defaults load (the refusal is the override's)


def test_an_integer_choice_refuses_a_float_that_equals_it():
    """32.0 == 32, but `precision: 32.0` would reach the Trainer as '32.0', which it refuses after the run opens."""
    from diffusion.stage_configs import TrainConfig

    assert TrainConfig.from_dict({"precision": 32}, "train").precision == 32
    for bad in (32.0, True):
        with pytest.raises(ConfigError, match="train.precision"):
            TrainConfig.from_dict({"precision": bad}, "train")


def test_error_lists_allowed_choices():
    with pytest.raises(ConfigError, match="'shapes', 'folder', 'webdataset'"):
        ShardConfig.from_dict({"source": "x"})


def test_a_yaml_boolean_given_for_a_word_says_why():
    """`-S shard.folder_layout=on` (or `yes`, `no`, `off`) is parsed by YAML as a boolean before the config sees
    it: the bare "got True" left the user wondering where True came from."""
    value = parse_override("shard.folder_layout=on")[1]
    with pytest.raises(ConfigError, match="got True: YAML reads yes, no, on and off as true or false; quote"):
        ShardConfig.from_dict({"folder_layout": value}, "shard")
    with pytest.raises(ConfigError, match="got 'x'$"):  # a word that is not a choice: the plain message
        ShardConfig.from_dict({"folder_layout": "x"}, "shard")


def test_yaml_numbers_are_coerced():
    cfg = ShardConfig.from_dict({"samples_per_shard": 1e3, "val_fraction": "1e-1"})
    assert cfg.samples_per_shard == 1000 and isinstance(cfg.samples_per_shard, int)
    assert cfg.val_fraction == pytest.approx(0.1)
    # YAML 1.1 reads 1e4 (no dot) as a string: `-S train.max_steps=1e4` is a whole number all the same.
    assert ShardConfig.from_dict({"samples_per_shard": "1e3"}).samples_per_shard == 1000
    for bad in ("1.5e0", "many", ".inf"):
        with pytest.raises(ConfigError, match="samples_per_shard: expected int"):
            ShardConfig.from_dict({"samples_per_shard": bad})


def test_non_finite_numbers_are_refused_at_load():
    """YAML's .inf and .nan are floats; no parameter means them, and `ge` bounds let infinity through: a guidance of
    .inf ran evaluate's main setting and its Inception features before the sampler refused it."""
    from diffusion.eval_configs import EvaluateConfig

    inf, nan = yaml.safe_load(".inf"), yaml.safe_load(".nan")  # what params.yaml and -S key=.inf give
    for section, data, key in [(EvaluateConfig, {"guidance": inf}, "evaluate.guidance"),
                               (EvaluateConfig, {"sweep": [{"sampler": "ddim", "steps": 5, "guidance": inf}]},
                                "evaluate.sweep"),
                               (TrainConfig, {"lr": nan}, "train.lr"),
                               (ShardConfig, {"val_fraction": -inf}, "shard.val_fraction")]:
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}.*finite"):
            section.from_dict(data, section.section)
    assert EvaluateConfig.from_dict({"guidance": "1e1"}, "evaluate").guidance == 10.0


def test_overrides_dvc_style(tmp_path):
    assert parse_override("shard.shapes.num_train=12") == (["shard", "shapes", "num_train"], 12)
    assert parse_override("shard.shapes.holdout=[red star, blue circle]")[1] == ["red star", "blue circle"]
    params = {"shard": {"resolution": 64}}
    out = apply_overrides(params, ["shard.resolution=32", "shard.shapes.level=pair"])
    assert out == {"shard": {"resolution": 32, "shapes": {"level": "pair"}}}
    assert params == {"shard": {"resolution": 64}}, "the input must not be modified"
    for bad in ["shard.resolution", "=3", "shard..x=1", "shard.resolution=[1"]:
        with pytest.raises(ConfigError):
            parse_override(bad)
    with pytest.raises(ConfigError, match="shard.resolution is not a mapping"):
        apply_overrides(params, ["shard.resolution.x=1"])


def test_load_params_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("shard: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_params(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("other: {}\n")
    with pytest.raises(ConfigError, match="section 'shard' is missing"):
        load_section(ShardConfig, empty)


def test_help_documents_every_field():
    helps = ShardConfig.help()
    assert set(helps) == {f for f in ShardConfig().to_dict()}
    assert all(text for text in helps.values())
    assert "(>= 8)" in helps["resolution"]


def test_fixed_length_tuples_load_from_lists():
    import dataclasses

    from diffusion.config import Config, param

    @dataclasses.dataclass(frozen=True)
    class Pair(Config):
        betas: tuple[float, int] = param((0.9, 2), "a float and an int")

    assert Pair.from_dict({"betas": [0.5, 3]}).betas == (0.5, 3)
    with pytest.raises(ConfigError, match=r"betas\[1\]"):
        Pair.from_dict({"betas": [0.5, "x"]})
    with pytest.raises(ConfigError, match="expected 2 items"):
        Pair.from_dict({"betas": [0.5]})


def test_inclusive_bounds_accept_their_end_points():
    """`ge`/`le` bounds are inclusive: a strict comparison would refuse caption_dropout 1.0 (always the null
    caption) or a constant learning rate (min_lr_ratio 1.0)."""
    from diffusion.data_configs import ShardConfig
    from diffusion.stage_configs import TrainConfig

    cfg = TrainConfig.from_dict({"caption_dropout": 1.0, "min_lr_ratio": 1.0, "warmup_steps": 0}, "train")
    assert (cfg.caption_dropout, cfg.min_lr_ratio, cfg.warmup_steps) == (1.0, 1.0, 0)
    assert ShardConfig.from_dict({"shapes": {"holdout_val_fraction": 1.0}}, "shard").shapes.holdout_val_fraction == 1.0


def test_a_stage_stopped_by_sigterm_exits_143_not_0(tmp_path, capsys):
    """Lightning turns SIGTERM into a SystemExit without a code (exit 0): `cli.py train && cli.py evaluate` then
    evaluated the previous model. The stage's command exits 143 instead; other exits pass through."""
    import typer
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from diffusion.cli import run_stage
    from diffusion.stage_configs import TrainConfig

    params = tmp_path / "params.yaml"
    params.write_text("train:\n  max_steps: 5\n")

    def terminated(cfg):
        assert cfg.max_steps == 5
        raise SIGTERMException

    with pytest.raises(typer.Exit) as stop:
        run_stage(TrainConfig, params, [], terminated)
    assert stop.value.exit_code == 143
    assert "train: stopped by SIGTERM before it finished, nothing exported" in capsys.readouterr().err

    def exits(cfg):
        raise SystemExit(3)

    with pytest.raises(SystemExit) as other:
        run_stage(TrainConfig, params, [], exits)
    assert other.value.code == 3


def test_a_rank_that_fails_after_sigterm_arrived_exits_143(tmp_path, capsys):
    """A preemption signals every rank at once; one may fail in a collective whose peer has left (gloo's "Connection
    closed by peer") before Lightning stops it. SIGTERM arrived while training (NoteSigterm, wrapped around Lightning's
    handler): the stage exits 143 with the resume message, not 1 with the traceback. Without SIGTERM the error is
    raised as it is."""
    import os
    import signal

    import pytorch_lightning as pl
    import torch
    import typer

    from diffusion.cli import run_stage
    from diffusion.stage_configs import TrainConfig
    from diffusion.training import trainer as training

    params = tmp_path / "params.yaml"
    params.write_text("train:\n  max_steps: 5\n")

    class Collective(pl.LightningModule):  # with `sigterm`, SIGTERM arrives in step 1; step 1's "all-reduce" fails
        def __init__(self, sigterm: bool):
            super().__init__()
            self.w, self.sigterm = torch.nn.Parameter(torch.ones(1)), sigterm

        def training_step(self, batch, i):
            if i == 1 and self.sigterm:
                os.kill(os.getpid(), signal.SIGTERM)
            return (self.w * batch).sum()

        def on_train_batch_end(self, outputs, batch, i):
            if i == 1:
                raise RuntimeError("Connection closed by peer")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(sigterm: bool):
        trainer = pl.Trainer(max_steps=5, callbacks=[training.NoteSigterm()], logger=False, enable_progress_bar=False,
                             enable_checkpointing=False, enable_model_summary=False, accelerator="cpu")
        trainer.fit(Collective(sigterm), torch.utils.data.DataLoader(torch.ones(8, 1), batch_size=2))

    training.SIGTERM_RECEIVED.clear()
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        run_stage(TrainConfig, params, [], lambda cfg: fit(sigterm=False))
    assert not training.SIGTERM_RECEIVED.is_set()
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(typer.Exit) as stop:
            run_stage(TrainConfig, params, [], lambda cfg: fit(sigterm=True))
    finally:
        training.SIGTERM_RECEIVED.clear()
    assert stop.value.exit_code == 143
    err = capsys.readouterr().err
    assert "train: stopped by SIGTERM before it finished (RuntimeError: Connection closed by peer" in err
    assert signal.getsignal(signal.SIGTERM) == before  # Lightning put its predecessor back, and ours went with it
