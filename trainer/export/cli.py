"""`python -m trainer export ...` (and `python -m trainer.export ...`): publish a run as a new version."""

from __future__ import annotations

import argparse
import sys

EXIT_REJECTED = 3  # quality gate said no; distinct from argparse's 2 and a crash's 1


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
        "--keep", type=_positive_int, default=None, help="keep only the newest N versions (N >= 1)"
    )


def run(args: argparse.Namespace) -> int:
    from trainer.export.publish import QualityGateError, publish
    from trainer.export.savedmodel import ExportVerificationError

    try:
        path = publish(
            args.run_dir,
            args.model_base,
            args.model_name,
            min_accuracy=args.min_accuracy,
            max_regression=args.max_regression,
            keep=args.keep,
        )
    except QualityGateError as exc:
        print(f"export rejected by quality gate: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    except (FileNotFoundError, FileExistsError, ValueError, ExportVerificationError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` subcommand to trainer/cli.py's parser; its handler is `args.handler(args) -> int`."""
    parser = subparsers.add_parser("export", help="export a run as a TensorFlow Serving SavedModel version")
    add_arguments(parser)
    parser.set_defaults(handler=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
