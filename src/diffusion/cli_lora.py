"""`cli.py merge-lora`: LoRA adapters merged into their base model at a scale, written as a model folder.

A ``train.lora`` run exports its model with the adapters merged in at scale 1 and writes the adapters alone beside it
(``lora.pt``, models/lora.py). This command makes the other models those adapters give: the base plus ``scale`` times
their update (diffusers' ``fuse_lora(lora_scale=...)`` then ``save_pretrained``), an ordinary model folder that
``sample --model``, the evaluate stage (``evaluate.model_dir``), MLflow serving and ``train.init_from`` read. Below 1
it keeps more of the base model, e.g. what fine-tuning on a narrow dataset made it forget (README, "LoRA").

Registered on ``diffusion.cli.app`` when that module is imported; kept apart as ``cli_sample`` is, so that the stage
commands, which DVC runs, do not read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffusion.cli import _fail, app


@app.command("merge-lora")
def merge_lora(
    lora: Annotated[str, typer.Argument(
        metavar="LORA", help="The lora.pt of a train.lora run, its folder, or an MLflow URI (runs:/ID/model/lora.pt).",
    )],
    out: Annotated[Path, typer.Option("--out", "-o", help="The model folder to write (replaced whole if it exists).")],
    scale: Annotated[float, typer.Option(
        help="How much of the adapters' update to add: 1 gives the run's own model, 0 the base.",
    )] = 1.0,
    model: Annotated[str | None, typer.Option(
        help="The base model folder or MLflow model URI; default: the model the adapters were trained on (their "
        "run's train.init_from).",
    )] = None,
) -> None:
    """Merge LoRA adapters into a model at a scale and write the result as a model folder.

    Each adapted layer's weight becomes W + scale * alpha / rank * B A. The folder is an ordinary model folder:
    sample it (`sample --model`), evaluate it (-S evaluate.model_dir=...), serve it or fine-tune from it. Adapters
    that do not fit the model (another architecture) are refused before anything is written; a model other than
    the adapters' base only warns.
    """
    from diffusion import atomic
    from diffusion.cli_sample import _sample_model_dir, adapters_base, check_scale, merge_adapters, read_lora
    from diffusion.config import ConfigError
    from diffusion.model_spec import MODEL_FILES, ModelNotFoundError
    from diffusion.pipeline_model import TextToImagePipeline

    check_scale(scale, "--scale")
    adapters = read_lora(lora, "LORA")
    base = model if model is not None else adapters_base(adapters, "LORA")
    model_dir, recorded_size = _sample_model_dir(base, Path("params.yaml"), None)
    if Path(out).resolve() == Path(model_dir).resolve():
        _fail(f"--out {out}: the base model's folder, which the merged model would replace; write another one", 2)
    try:
        atomic.check_replaceable(out, MODEL_FILES, "--out")
        pipe = TextToImagePipeline.from_pretrained(model_dir, device="cpu", image_size=recorded_size)
    except ConfigError as e:
        _fail(str(e), 2)
    except ModelNotFoundError as e:
        _fail(f"--model {e}" if model is not None else str(e), 1)
    merge_adapters(pipe, adapters, scale, "LORA")
    # Where the weights came from, beside the base's training settings (train_config.json keeps those); the sha256
    # lets sample and merge-lora refuse to merge the same adapters into this model a second time.
    pipe.train_config["merged_lora"] = {"lora": adapters["path"], "sha256": adapters["sha256"],
                                        "base": str(base), "scale": scale}
    pipe.save_pretrained(out)
    typer.echo(f"merge-lora: {len(adapters['layers'])} adapted layers (rank {adapters['rank']}) of {adapters['path']} "
               f"merged into {base} at scale {scale:g} -> {out}")
