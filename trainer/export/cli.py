"""`python -m trainer export ...` (and `python -m trainer.export ...`): publish a run as a new version;
`python -m trainer.export promote|rollback|canary|labels ...`: move the stable and canary labels."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from contract.labels import SHADOW, SPLIT, LabelsError
from trainer.export import labels
from trainer.export.arguments import LABEL_COMMANDS, add_arguments, add_label_arguments

EXIT_REJECTED = 3  # quality gate said no; distinct from argparse's 2 and a crash's 1
EXIT_REFUSED = 4  # a label move was refused as unsafe (the reason is on stderr); nothing changed


def _log_to_stderr() -> None:
    if not logging.getLogger().handlers:
        # The log (stderr) says what --keep removed and kept, and why; stdout stays the published path.
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def run(args: argparse.Namespace) -> int:
    """Publish `args.run_dir` (flags of trainer/export/arguments.py); prints the version's path."""
    # Imported here: the label commands need no TensorFlow or Keras.
    from trainer.export.gate import QualityGateError
    from trainer.export.publish import publish
    from trainer.export.savedmodel import ExportVerificationError

    _log_to_stderr()
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
            min_class_recall=getattr(args, "min_class_recall", None),
            min_class_f1=getattr(args, "min_class_f1", None),
            force_new_baseline=getattr(args, "force_new_baseline", False),
            as_canary=getattr(args, "as_canary", False),
            canary_percent=getattr(args, "canary_percent", 10.0),
            canary_mode=SHADOW if getattr(args, "canary_shadow", False) else SPLIT,
            ood_keep=getattr(args, "ood_keep", 0.95),
            ood_photos=getattr(args, "ood_photos", None),
        )
    except QualityGateError as exc:
        print(f"export rejected by quality gate: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    except (FileNotFoundError, FileExistsError, ValueError, ExportVerificationError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def run_labels(args: argparse.Namespace) -> int:
    """promote|rollback|canary|labels: prints what changed (or that nothing had to); exit 0 when the
    labels are as asked, EXIT_REFUSED for an unsafe move, 1 for a bad file."""
    _log_to_stderr()
    model_dir = Path(args.model_base) / args.model_name
    where = {
        "serving_config": Path(args.serving_config) if args.serving_config else None,
        "model_name": args.model_name,
    }
    command = args.label_command
    try:
        if command == "labels":
            print(labels.describe(model_dir))
            return 0
        if command == "promote":
            if (args.version is None) == (not args.canary):
                print("promote: give a VERSION or --canary (not both)", file=sys.stderr)
                return 2
            change = labels.promote(model_dir, args.version, canary=args.canary, **where)
        elif command == "rollback":
            change = labels.rollback(model_dir, expect_stable=args.expect_stable, **where)
        elif args.off:
            change = labels.clear_canary(model_dir, **where)
        elif args.version is None:
            print("canary: give a VERSION (with --percent P [--shadow]) or --off", file=sys.stderr)
            return 2
        else:
            mode = SHADOW if args.shadow else SPLIT
            change = labels.set_canary(model_dir, args.version, args.percent, mode=mode, **where)
    except labels.LabelMoveRefused as exc:
        print(f"{command} refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except (LabelsError, FileNotFoundError, ValueError) as exc:
        print(f"{command} failed: {exc}", file=sys.stderr)
        return 1
    print(change.message)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in LABEL_COMMANDS:
        parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__)
        add_label_arguments(parser)
        return run_labels(parser.parse_args(argv))
    parser = argparse.ArgumentParser(
        prog="python -m trainer.export",
        description=__doc__,
        epilog=f"Label commands: python -m trainer.export {{{','.join(LABEL_COMMANDS)}}} --help",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
