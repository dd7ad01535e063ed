"""`python -m trainer export ...` (and `python -m trainer.export ...`): publish a run as a new version."""

from __future__ import annotations

import argparse
import logging
import sys

from trainer.export.arguments import add_arguments
from trainer.export.publish import QualityGateError, publish
from trainer.export.savedmodel import ExportVerificationError

EXIT_REJECTED = 3  # quality gate said no; distinct from argparse's 2 and a crash's 1


def run(args: argparse.Namespace) -> int:
    """Publish `args.run_dir` (flags of trainer/export/arguments.py); prints the version's path."""
    if not logging.getLogger().handlers:
        # The log (stderr) says what --keep removed and kept, and why; stdout stays the published path.
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = publish(
            args.run_dir,
            args.model_base,
            args.model_name,
            min_accuracy=args.min_accuracy,
            max_regression=args.max_regression,
            keep=args.keep,
            tta=args.tta,
            serving_config=args.serving_config,
        )
    except QualityGateError as exc:
        print(f"export rejected by quality gate: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    except (FileNotFoundError, FileExistsError, ValueError, ExportVerificationError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
