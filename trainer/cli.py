"""``trainer``: train and evaluate vision transformers on token labels from the store."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import click

store_option = click.option("--store", envvar="LABELER_STORE", default="store", show_default=True,
                            help="Store path or fsspec URL (env LABELER_STORE).")


def user_errors(fn):
    """Errors a user can fix (a checkpoint that is not one, a missing label set, a bad option
    value) as one line and exit status 1."""
    from storage import StoreError
    from trainer.checkpoints import CheckpointError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (CheckpointError, StoreError, ValueError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from None
        except KeyError as e:  # the store's "no dataset / label set ..." lookups
            raise click.ClickException(e.args[0] if e.args else str(e)) from None
    return wrapper


class FiniteRange(click.FloatRange):
    """A float range that refuses nan and infinities too (click's FloatRange lets nan through:
    every comparison with it is False)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number.", param, ctx)
        return number


# Model options with a flag of their own: the flag is their one home.
FLAG_OPTIONS = {"registers": "--registers", "sta": "--sta", "anf": "--anf"}


def parse_model_kwargs(text: str) -> dict:
    """``--model-kwargs``: a JSON object of model options, none of which a flag sets (the model
    checks the names and types: ``trainer.models.check_options``)."""
    try:
        options = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--model-kwargs is not JSON ({e})") from None
    if not isinstance(options, dict):
        raise ValueError(f"--model-kwargs must be a JSON object of model options, e.g. "
                         f'\'{{"drop_path": 0.1}}\', not {text!r}')
    for key, flag in FLAG_OPTIONS.items():
        if key in options:
            raise ValueError(f"--model-kwargs: set {key!r} with {flag}")
    return options


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train vision transformers (LV-ViT, ViT) on token labels."""


@main.command()
@store_option
@click.option("--dataset", required=True)
@click.option("--labels", "labelset", required=True, help="Label set id.")
@click.option("--model", default="lvvit_t", show_default=True, help="See `trainer models`.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--input-size", type=click.IntRange(16), default=224, show_default=True)
@click.option("--epochs", type=click.IntRange(1), default=300, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True,
              help="Per process.")
@click.option("--lr", type=float, default=1.6e-3, show_default=True,
              help="Per 1024 images; scaled by the global batch size.")
@click.option("--warmup-epochs", type=float, default=5.0, show_default=True)
@click.option("--crop-scale", type=click.FloatRange(0.05, 1.0), default=0.08, show_default=True,
              help="Smallest RandomResizedCrop area, as a share of the image (1: whole images).")
@click.option("--beta", type=FiniteRange(0), default=0.5, show_default=True,
              help="Token loss weight (0: the token loss off).")
@click.option("--label-smoothing", type=float, default=0.0, show_default=True)
@click.option("--gt-weight", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Blend the ground-truth class into the class target.")
@click.option("--target-mode", type=click.Choice(["exact", "official"]), default="exact",
              show_default=True, help="exact: RoIAlign the teacher's probabilities; official: "
                                      "RoIAlign the scattered top-K logits, then softmax.")
@click.option("--no-token-label", is_flag=True, help="Ground-truth class only (the baseline).")
@click.option("--no-mix-token", is_flag=True)
@click.option("--registers", type=click.IntRange(0), default=0, show_default=True)
@click.option("--sta", is_flag=True, help="Structured Token Augmentation (training only).")
@click.option("--anf", is_flag=True, help="Adaptive Noise Filtering between blocks.")
@click.option("--ema", type=float, default=0.0, show_default=True, help="EMA decay (0: off).")
@click.option("--workers", type=click.IntRange(0), default=4, show_default=True)
@click.option("--model-kwargs", default="{}", help="More model options as JSON, e.g. "
              '\'{"drop_path": 0.1, "sta_sigma": 0.2, "anf_norm": false}\'.')
@click.option("--max-steps-per-epoch", type=click.IntRange(1), default=None)
@click.option("--save-every", type=click.IntRange(1), default=500, show_default=True,
              help="Steps between mid-epoch checkpoints.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--val-permille", type=click.IntRange(0, 999), default=20, show_default=True,
              help="Images held out for `trainer eval`, per mille, by path hash.")
@click.option("--resume", is_flag=True, help="Go on from OUT/last.pt, mid-epoch if it was.")
@click.option("--init", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Fine-tune from these weights: an official LV-ViT checkpoint, "
                                 "one of ours, or a state dict (new heads if the class count "
                                 "differs; position embedding resampled to --input-size).")
@click.option("--rand-augment/--no-rand-augment", default=False, show_default=True,
              help="rand-m9-mstd0.5-inc1; its geometric ops move the token labels too.")
@click.option("--color-jitter", type=click.FloatRange(0), default=0.4, show_default=True,
              help="Brightness, contrast and saturation in [1 - j, 1 + j] (0: off).")
@click.option("--random-erase", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Probability of erasing a rectangle of pixels (labels unchanged).")
@click.option("--weight-decay", type=float, default=0.05, show_default=True)
@click.option("--clip-grad", type=click.FloatRange(0), default=1.0, show_default=True,
              help="Gradient-norm clipping (0: none).")
@click.option("--recipe", type=click.Choice(["lvvit"]), default=None,
              help="A published recipe's settings for every option not given (README).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@user_errors
def train(**options) -> None:
    """Train MODEL on DATASET's images and the token labels of label set LABELS."""
    from trainer.train import TrainConfig, with_recipe
    from trainer.train import train as run

    options["model_kwargs"] = {"registers": options.pop("registers"),
                               "sta": options.pop("sta"), "anf": options.pop("anf"),
                               **parse_model_kwargs(options["model_kwargs"])}
    options["crop_scale"] = (options["crop_scale"], 1.0)
    options["token_label"] = not options.pop("no_token_label")
    options["mix_token"] = not options.pop("no_mix_token")
    options["labels"] = options.pop("labelset")
    options["out"] = str(options["out"])
    options["init"] = str(options["init"]) if options["init"] else None
    resume, recipe = options.pop("resume"), options.pop("recipe")
    config = TrainConfig(**options)
    if recipe:
        context = click.get_current_context()
        given = {name for name in options
                 if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
        config = with_recipe(config, recipe, keep=given)
    last = run(config, resume=resume)
    click.echo(json.dumps(last))


@main.command("eval")
@store_option
@click.option("--dataset", required=True)
@click.option("--labels", "labelset", required=True)
@click.option("--checkpoint", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--val-permille", type=click.IntRange(1, 1000), default=None,
              help="The held-out share, per mille (default: what the run held out).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@user_errors
def evaluate_cmd(store: str, dataset: str, labelset: str, checkpoint: Path,
                 val_permille: int | None, batch_size: int) -> None:
    """Top-1/top-5 on the held-out split."""
    from trainer.checkpoints import read_checkpoint
    from trainer.evaluate import evaluate

    if val_permille is None:
        trained = read_checkpoint(checkpoint).extra.get("val_permille")
        if not trained:
            raise click.ClickException(
                f"{checkpoint} does not say what its run held out: pass --val-permille")
        val_permille = int(trained)

    click.echo(json.dumps(evaluate(checkpoint, store, dataset, labelset, batch_size=batch_size,
                                   val_permille=val_permille)))


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@store_option
@click.option("--dataset", required=True)
@click.option("--images", type=click.IntRange(1), default=64, show_default=True)
@user_errors
def artifacts(checkpoint: Path, store: str, dataset: str, images: int) -> None:
    """Feature-map artifact metrics: outlier-token share and CLS-attention entropy."""
    from trainer.evaluate import artifact_metrics

    click.echo(json.dumps(artifact_metrics(checkpoint, store, dataset, images=images)))


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", default=None,
              help="The variant, when the checkpoint cannot tell (a bare state dict).")
@user_errors
def convert(checkpoint: Path, out: Path, model: str | None) -> None:
    """Write CHECKPOINT (official LV-ViT, ours, a state dict) as OUT in this project's format."""
    from trainer.checkpoints import read_checkpoint, save_project_checkpoint

    read = read_checkpoint(checkpoint, model=model)
    save_project_checkpoint(read, out)
    click.echo(f"{out}: {read.model} ({read.source} checkpoint), "
               f"{read.overrides.get('num_classes')} classes")


@main.command()
def models() -> None:
    """The registered variants with their parameter counts (1000 classes, 224 px)."""
    import torch

    from trainer.models import create_model, list_models

    for name in list_models():
        with torch.device("meta"):
            count = sum(p.numel() for p in create_model(name).parameters())
        click.echo(f"{name}\t{count / 1e6:.2f}M")
    from trainer.models.timm_models import SUPPORTED

    click.echo(f"timm:NAME\tany of {SUPPORTED}, e.g. timm:deit_small_patch16_224")
