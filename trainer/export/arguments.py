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


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a percentage such as 10") from None
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..100; give a percentage of requests, e.g. 10")
    return value


def _share(text: str) -> float:
    """A share strictly inside 0..1 (0 or 1 would make the abstention threshold meaningless)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a share such as 0.95") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not strictly between 0 and 1; give a share, e.g. 0.95")
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
        help="refuse to publish if test accuracy drops more than this below the served version (labels.json "
        "stable, else the newest), both measured now on this run's test split",
    )
    parser.add_argument(
        "--min-class-recall",
        type=_fraction,
        default=None,
        help="refuse to publish when any class's test recall is below this (0..1)",
    )
    parser.add_argument(
        "--min-class-f1",
        type=_fraction,
        default=None,
        help="refuse to publish when any class's test F1 is below this (0..1)",
    )
    parser.add_argument(
        "--force-new-baseline",
        action="store_true",
        help="publish even though the served version was validated on other data or classes (its card's "
        "evaluation_data differs), so --max-regression cannot compare: a deliberate new baseline",
    )
    parser.add_argument(
        "--as-canary",
        action="store_true",
        help="label the new version canary in MODEL_BASE/<name>/labels.json (stable keeps serving); "
        "promote it later with `python -m trainer.export promote --canary`",
    )
    parser.add_argument(
        "--canary-percent",
        type=_percent,
        default=10.0,
        help="with --as-canary: share of requests the canary answers, 0..100 (default 10)",
    )
    parser.add_argument(
        "--canary-shadow",
        action="store_true",
        help="with --as-canary: the canary gets a mirrored copy of the traffic; users get stable's answers",
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
        "--ood-keep",
        type=_share,
        default=0.95,
        help="share of held-out in-distribution images the abstention threshold leaves unflagged, "
        "strictly between 0 and 1 (default 0.95); the rest sets how often a real photo is 'not sure'",
    )
    parser.add_argument(
        "--ood-photos",
        default=None,
        metavar="DIR",
        help="a folder of labelled photos (labels.csv: file,label) the out-of-distribution report also "
        "measures on: in-distribution when its labels are the model's classes, out-of-class otherwise",
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


LABEL_COMMANDS = ("promote", "rollback", "canary", "labels")


def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    """`python -m trainer.export promote|rollback|canary|labels` (trainer/export/labels.py)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model-base", required=True, help="TF Serving model base directory (e.g. models)")
    common.add_argument("--model-name", default="cifar10", help="model name: MODEL_BASE/<name>/labels.json")
    common.add_argument(
        "--serving-config",
        default=None,
        metavar="MODELS_CONFIG",
        help="also rewrite TF Serving's models.config: version_labels stable/canary and "
        "specific { versions } of the labelled versions (a writable copy of what --model_config_file reads)",
    )
    sub = parser.add_subparsers(dest="label_command", required=True)
    p = sub.add_parser("promote", parents=[common], help="make a version (or the canary) stable")
    p.add_argument("version", nargs="?", type=_positive_int, help="the version to make stable")
    p.add_argument("--canary", action="store_true", help="promote the current canary")
    p = sub.add_parser("rollback", parents=[common], help="make the previous stable version stable again")
    p.add_argument(
        "--from",
        dest="expect_stable",
        type=_positive_int,
        default=None,
        metavar="VERSION",
        help="roll back only if VERSION is stable now (a retried rollback then does nothing)",
    )
    p = sub.add_parser("canary", parents=[common], help="label a version canary, or stop the canary")
    p.add_argument("version", nargs="?", type=_positive_int, help="the version to label canary")
    p.add_argument("--percent", type=_percent, default=10.0, help="share of requests, 0..100 (default 10)")
    p.add_argument("--shadow", action="store_true", help="mirror traffic to it; users get stable's answers")
    p.add_argument("--off", action="store_true", help="remove the canary label: stable takes all traffic")
    sub.add_parser("labels", parents=[common], help="show labels.json and the published versions")
