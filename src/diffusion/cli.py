"""The command line: one command per pipeline stage, each reading its section of params.yaml.

``python cli.py <stage>`` (or the installed ``diffusion <stage>``) is what dvc.yaml runs. Every command
takes ``--params PATH`` and DVC-style overrides ``-S section.key=value`` (repeatable), exactly as
``dvc exp run -S`` spells them. A bad parameter exits with code 2 and a message naming the key, before
the stage reads or writes anything.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable

import typer

from diffusion.cli_text import (
    epilog_when_asked,
    show_warnings_plainly,
    unwrap_command_help,
)
from diffusion.config import Config, ConfigError
from diffusion.params import BASE_PROFILE, load_params, load_section

app = typer.Typer(
    help="Train a text-to-image latent diffusion model: each command is one stage of the DVC pipeline "
    "(dvc.yaml), configured by its section of params.yaml.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="The parameters file (one section per stage). Its relative paths, "
                       "like the MLflow store's, are taken from the working folder: run from the project's root, as "
                       "DVC does. Profiles are read from profiles/ beside this file.")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-S",
        help="Override a parameter, as `dvc exp run -S` does: section.key=value (value read as YAML). Repeatable. "
        "`-S profile=gpu` selects the profile profiles/gpu.yaml (256 px, DiT-B/2, one 80 GB GPU); other "
        "overrides apply over the profile.",
    ),
]


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def run_stage(
    cls: type[Config], params: Path, overrides: list[str] | None, main: Callable[[Any], Any],
    input_errors: tuple[type[Exception], ...] = (),
) -> Any:
    """Load and validate the section, then run the stage's `main`.

    Exit 2 on a bad parameter (found on load, or by the stage's own checks before it works); exit 1 on a
    missing or unusable input (`input_errors`, and a damaged shard for every stage), with the message naming
    what to run or fix.
    """
    from diffusion.data.shard_reading import DamagedShardError
    from diffusion.stage_configs import check_every_section

    input_errors = (*input_errors, DamagedShardError)
    try:
        cfg = load_section(cls, params, overrides or [])
        check_every_section(params, overrides or [])  # a mistake in another stage's section stops this one too
        _note_profile(params, overrides or [])
        return main(cfg)
    except ConfigError as e:
        _fail(str(e), 2)
    except input_errors as e:
        _fail(str(e), 1)
    except SystemExit as e:
        if _stopped_by_sigterm(e):
            # Lightning answers SIGTERM (kill, docker stop, a scheduler's preemption) by raising its SIGTERMException
            # at the next batch, a SystemExit without a code: the process exited 0 having exported nothing, and
            # `cli.py train && cli.py evaluate` went on to evaluate the previous model. 143 = 128 + 15, the status
            # of a process SIGTERM killed.
            _fail(f"{cls.section}: stopped by SIGTERM before it finished, nothing exported; run it again to resume "
                  "from its last checkpoint", 143)
        raise
    except Exception as e:
        if not _sigterm_received():
            raise
        # Every rank signalled at once (a preemption): this one failed in a collective another had left.
        _fail(f"{cls.section}: stopped by SIGTERM before it finished ({type(e).__name__}: {str(e)[:200]}, as the "
              "processes of the run stopped), nothing exported; run it again to resume from its last checkpoint", 143)


def _note_profile(params: Path, overrides: list[str]) -> None:
    """Put the profile the stage runs with where its MLflow run's tags read it (``tracking.PROFILE_ENV``)."""
    from diffusion.tracking import PROFILE_ENV

    os.environ[PROFILE_ENV] = str(load_params(params, overrides).get("profile", BASE_PROFILE))


def _stopped_by_sigterm(e: SystemExit) -> bool:
    """`e` is Lightning's SIGTERMException (only looked for once Lightning is imported: no stage imports it for
    nothing)."""
    if "pytorch_lightning" not in sys.modules:
        return False
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    return isinstance(e, SIGTERMException)


def _sigterm_received() -> bool:
    """SIGTERM arrived while a Trainer trained (``training.trainer.NoteSigterm``; nothing trained if the module is not
    imported)."""
    trainer = sys.modules.get("diffusion.training.trainer")
    return trainer is not None and trainer.SIGTERM_RECEIVED.is_set()


def _shard_config() -> type[Config]:
    from diffusion.data_configs import ShardConfig

    return ShardConfig


@app.command(epilog=epilog_when_asked("shard", _shard_config))
def shard(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Write the dataset as WebDataset shards, train the tokenizer, and count what was skipped.

    Sources: the built-in procedural 'shapes' dataset (the default), a folder of your own images
    (metadata.jsonl, side-car .txt captions, or one subfolder per class), or existing WebDataset tars
    (as img2dataset writes them). Writes <out_dir>/{train,val}/*.tar, <out_dir>/manifest.json and the
    tokenizer; corrupt or uncaptioned images are skipped and counted in the manifest.
    """
    from pipeline import shard as stage
    from diffusion.data.sources import SourceError

    run_stage(_shard_config(), params, set_, stage.main, (SourceError, stage.ShardError))


def _encode_latents_config() -> type[Config]:
    from diffusion.data_configs import EncodeLatentsConfig

    return EncodeLatentsConfig


@app.command("encode-latents", epilog=epilog_when_asked("encode-latents", _encode_latents_config))
def encode_latents(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Encode the image shards with the frozen VAE into latent shards (posterior mean and log-variance).

    Reads <shards_dir>/{train,val}/*.tar (from `shard`) and the VAE in <vae_dir> (from `train-vae`), and
    writes <out_dir>/{train,val}/*.tar and <out_dir>/manifest.json. The posterior is stored, not a sample,
    so training draws new latents every epoch; captions are stored as text and tokenized at load time.
    """
    from pipeline import encode_latents as stage

    run_stage(_encode_latents_config(), params, set_, stage.main, (stage.EncodeLatentsError,))


def _training_errors() -> tuple[type[Exception], ...]:
    """What stops a training stage that is not a bug, printed as one line: a non-finite loss (naming the step),
    a damaged checkpoint (naming what to delete), nodes that do not run the same run (naming what differs)."""
    from diffusion.training.checkpointing import CheckpointError
    from diffusion.training.exact_resume import RanksDisagreeError
    from diffusion.training.nonfinite import NonFiniteLossError

    return NonFiniteLossError, CheckpointError, RanksDisagreeError


def _train_vae_config() -> type[Config]:
    from diffusion.stage_configs import TrainVAEConfig

    return TrainVAEConfig


@app.command("train-vae", epilog=epilog_when_asked("train-vae", _train_vae_config))
def train_vae(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Train the KL autoencoder on the image shards; measure its latent scale and shift.

    Reads <shards_dir>/{train,val}/*.tar (from `shard`) and writes <out_dir>/ (model.pt, and config.json
    with the VAE's config, latent_scale and latent_shift) and <metrics_path> (val PSNR/SSIM, losses).
    Checkpoints go to <checkpoint_dir>/train_vae-<key>/; rerun with the same parameters, it resumes
    there and continues the same MLflow run. A non-finite loss stops it with an error naming the step.
    """
    from pipeline import train_vae as stage

    run_stage(_train_vae_config(), params, set_, stage.main, (stage.TrainVAEError, *_training_errors()))


def _train_config() -> type[Config]:
    from diffusion.stage_configs import TrainConfig

    return TrainConfig


@app.command("train", epilog=epilog_when_asked("train", _train_config))
def train(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Train the text encoder and the denoiser (U-Net or DiT) on the cached latents, with EMA.

    Reads <latents_dir>/train/*.tar (from `encode-latents`), the tokenizer (from `shard`) and the VAE
    (from `train-vae`); writes the EMA model, its config and the tokenizer to <out_dir>, the final figures
    to <metrics_path>, the loss curve to <loss_curve_path> and the validation loss (held out and seen, every
    val_every_n_steps) to <val_curve_path>. Sample grids for fixed prompts go to
    MLflow every sample_every_n_steps. Checkpoints go to <checkpoint_dir>/train-<key>/; rerun with the
    same parameters it resumes there (step, optimizer, EMA) in the same MLflow run. Choose the network
    with -S train.denoising_type=dit (and -S train.dit_preset=DiT-S/2 for a preset); fine-tune a trained
    model with -S train.init_from=<its folder> (every weight, or LoRA adapters with -S train.lora.rank=8).
    """
    from pipeline import train as stage

    run_stage(_train_config(), params, set_, stage.main, (stage.TrainError, *_training_errors()))


# ---- sample -----------------------------------------------------------------------------------------


def _strength_in_range(strength: float | None) -> float | None:
    """--strength refused (exit 2) outside (0, 1], with or without --image, in the words `sample` refuses its other
    values with (``error: --strength: ...``, as a strength too small for --steps in ``cli_sample.run``), not in
    typer's usage box, which stays for what typer checks itself (a number, --steps >= 1)."""
    if strength is not None:
        from diffusion.timesteps import check_strength

        try:
            check_strength(strength)
        except ValueError as e:
            _fail(f"--strength: {str(e).removeprefix('strength: ')}", 2)
    return strength


# sample's arguments and options, one alias each, so that the command below reads as its list of parameters.
PromptsArgument = Annotated[
    list[str], typer.Argument(metavar="PROMPT", help="Prompt(s); repeat for several. \"\" samples unconditionally.")
]
NumImagesOption = Annotated[int, typer.Option("--num-images", "-n", min=1, help="Images per prompt.")]
StepsOption = Annotated[int, typer.Option(min=1, help="Sampler steps.")]
GuidanceOption = Annotated[float, typer.Option(help="Classifier-free guidance scale (1: none).")]
NegativePromptOption = Annotated[str, typer.Option(
    "--negative-prompt", help="What guidance steers away from, for every prompt, in place of the empty caption.",
)]
GuidanceRescaleOption = Annotated[float, typer.Option(
    "--guidance-rescale", help="0-1: rescale the guided prediction (Lin et al. 2023), for strong guidance.",
)]
SamplerOption = Annotated[str, typer.Option(
    help="ddpm | ddim | dpmpp (DPM-Solver++ 2M) | euler | euler_a (Euler ancestral) | heun (2 network calls/step).",
)]
SeedOption = Annotated[int, typer.Option(help="Seed of the initial noise; the same seed gives the same images.",
                                         min=0, max=2**64 - 1)]  # what torch.Generator.manual_seed takes
OutOption = Annotated[Path, typer.Option("--out", "-o", help="The PNG to write (a grid for several images).")]
ModelOption = Annotated[str | None, typer.Option(
    help="A model folder, or an MLflow model URI (models:/NAME@ALIAS, runs:/ID/PATH); default: train.out_dir "
    "of --params."
)]
SizeOption = Annotated[int | None, typer.Option(
    help="Image side in pixels, a multiple of the model's latent factor; default: the training resolution."
)]
DeviceOption = Annotated[str, typer.Option(help="auto | cpu | cuda ...")]
ImageOption = Annotated[Path | None, typer.Option(
    help="Image to image (SDEdit): start from this image (for every prompt), resized to the sample size "
    "(stretched, not cropped), instead of pure noise.",
)]
StrengthOption = Annotated[float | None, typer.Option(
    callback=_strength_in_range, show_default=False,
    help="With --image, in (0, 1]: how much of the schedule runs, from the image noised that far (int(steps * "
    "strength) steps); low keeps the image, 1 all but forgets it (default 0.8).",
)]
MaskOption = Annotated[Path | None, typer.Option(
    help="Inpainting, with --image: regenerate the white (>= 128) of this mask, keep the rest of the image's "
    "latents; read as grayscale, resized to the sample size as the image is.",
)]
LoraOption = Annotated[str | None, typer.Option(
    help="LoRA adapters to merge into the model first: the lora.pt of a train.lora run (or its folder, or "
    "runs:/ID/model/lora.pt); without --model, into the model they were trained on.",
)]
LoraScaleOption = Annotated[float, typer.Option(
    "--lora-scale", help="With --lora: how much of the adapters' update to add (1: the run's model, 0: none).",
)]


@app.command("sample")
def sample(
    prompts: PromptsArgument,
    num_images: NumImagesOption = 1,
    steps: StepsOption = 20,
    guidance: GuidanceOption = 4.0,
    negative_prompt: NegativePromptOption = "",
    guidance_rescale: GuidanceRescaleOption = 0.0,
    sampler: SamplerOption = "dpmpp",
    seed: SeedOption = 0,
    out: OutOption = Path("samples.png"),
    model: ModelOption = None,
    size: SizeOption = None,
    device: DeviceOption = "auto",
    image: ImageOption = None,
    strength: StrengthOption = None,
    mask: MaskOption = None,
    lora: LoraOption = None,
    lora_scale: LoraScaleOption = 1.0,
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Sample images for text prompts from the trained model and write them as one PNG.

    Reads the train stage's model folder (default <train.out_dir>, from `python cli.py train`) or a model
    registered in MLflow by the evaluate stage. Options are checked before the model is loaded; an empty
    prompt, characters outside the vocabulary and prompts over the tokenizer's length only warn. With --image, the
    sampler starts from that image, noised part of the way, and runs the rest of the schedule (image to image);
    with --mask too, only the mask's white is regenerated (inpainting by latent blending).
    """
    from diffusion import cli_sample

    cli_sample.run(prompts, num_images=num_images, steps=steps, guidance=guidance, negative_prompt=negative_prompt,
                   guidance_rescale=guidance_rescale, sampler=sampler, seed=seed, out=out, model=model, size=size,
                   device=device, image=image, strength=strength, mask=mask, lora=lora, lora_scale=lora_scale,
                   params=params, set_=set_)


def _judge_config() -> type[Config]:
    from diffusion.eval_configs import JudgeConfig

    return JudgeConfig


@app.command("train-judge", epilog=epilog_when_asked("train-judge", _judge_config))
def train_judge(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Train the attribute judge (a small CNN) on the real train shards; score it on the real val images.

    Reads <shards_dir>/{train,val}/*.tar and manifest.json (from `shard`); writes <out_dir>/ (model.pt,
    config.json with the attribute vocabulary) and <metrics_path> (per-attribute and all-correct accuracy on
    real val images: the reference, or "ceiling", for prompt adherence). Data without attributes gets an empty judge, and
    `evaluate` then reports FID/KID only.
    """
    from pipeline import train_judge as stage

    run_stage(_judge_config(), params, set_, stage.main, (stage.TrainJudgeError,))


def _evaluate_config() -> type[Config]:
    from diffusion.eval_configs import EvaluateConfig

    return EvaluateConfig


@app.command("evaluate", epilog=epilog_when_asked("evaluate", _evaluate_config))
def evaluate(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Evaluate the trained model: prompt adherence, FID/KID, judge FD, speed, a sampler sweep, a grid.

    Reads the EMA model in <model_dir> (from `train`), the judge in <judge_dir> (from `train-judge`) and the
    real val shards. Writes <metrics_path> (flat figures for `dvc metrics show`), <sweep_path> (one row per
    sampler setting) and <samples_path> (grid prompts x seeds, captioned), logs them to one MLflow run,
    and registers the model as <registered_model_name>@<registered_model_alias>.
    """
    from pipeline import evaluate as stage

    run_stage(_evaluate_config(), params, set_, stage.main, (stage.EvaluateError,))


from diffusion import cli_lora  # noqa: F401 (registers `merge-lora`; its own module, as sample's cli_sample)


def main() -> None:
    """Entry point of the `diffusion` console script and of `python cli.py`."""
    unwrap_command_help(app)
    show_warnings_plainly()
    app(prog_name=Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith("cli.py") else "diffusion")
