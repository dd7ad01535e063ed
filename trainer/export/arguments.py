"""The `export` subcommand's flags, for `python -m trainer export` and `python -m trainer.export`.

Imports no TensorFlow (unlike the rest of trainer/export), so trainer/cli.py can list the subcommand
on machines that train under JAX without TensorFlow installed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from trainer.export import tta

HELP = "export a run as a TensorFlow Serving SavedModel version"


def _fraction(text: str) -> float:
    """An accuracy as a fraction: '85' or '85%' is a common slip that would make every gate pass or fail."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a fraction such as 0.85") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..1; give accuracy as a fraction, e.g. 0.85")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1: the newest version is never removed")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="training run directory holding model.keras")
    parser.add_argument("--model-base", required=True, help="TF Serving model base directory (e.g. models)")
    parser.add_argument("--model-name", default="cifar10", help="model name: MODEL_BASE/<name>/<version>/")
    parser.add_argument(
        "--min-accuracy",
        type=_fraction,
        default=None,
        help="refuse to publish below this test accuracy (0..1)",
    )
    parser.add_argument(
        "--max-regression",
        type=_fraction,
        default=None,
        help="refuse to publish if test accuracy drops more than this below the newest version",
    )
    parser.add_argument(
        "--keep",
        type=_positive_int,
        default=None,
        help="keep only the newest N versions (N >= 1), and every version --serving-config serves, "
        "pins or labels",
    )
    parser.add_argument(
        "--serving-config",
        default=None,
        metavar="MODELS_CONFIG",
        help="TF Serving's models.config (what it reads with --model_config_file): --keep never removes "
        "a version it serves (latest/all), pins (specific) or labels (version_labels)",
    )
    parser.add_argument(
        "--tta",
        choices=tta.CHOICES,
        default=tta.NONE,
        help="test-time augmentation built into the signatures: 'flip' averages the probabilities of "
        "each image and its horizontal mirror (twice the model's compute per image); default none",
    )


def register(subparsers: argparse._SubParsersAction, handler: Callable[[argparse.Namespace], int]) -> None:
    """Add the `export` subcommand to trainer/cli.py's parser, run by `handler(args) -> exit code`
    (trainer.export.cli.run, imported by the caller when it runs)."""
    parser = subparsers.add_parser("export", help=HELP)
    add_arguments(parser)
    parser.set_defaults(handler=handler)
