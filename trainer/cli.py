"""`python -m trainer {train,evaluate,sweep,export} ...`: the trainer's command line.

Config precedence, lowest first: built-in defaults (trainer/config.py) < the resumed run's
config.json (with --resume) < --config FILE < the shortcut flags (--dataset, --epochs, ...)
< --set section.key=value. Every subcommand's handler is `args.handler(args) -> exit code`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer import config as config_mod
from trainer import run_files
from trainer.config import Config, ConfigError
from trainer.evaluate import evaluate_run
from trainer.export import arguments as export_arguments
from trainer.sweep import parse_values, sweep
from trainer.train import train

EXIT_ERROR = 1  # the run failed (bad data, missing files, refused resume)
EXIT_USAGE = 2  # bad flags or config (argparse uses 2 as well)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML/JSON config file (e.g. configs/quick.yaml)")
    parser.add_argument("--dataset", choices=("cifar10", "imagefolder", "synthetic"),
                        help="data source (data.dataset)")
    parser.add_argument("--data-dir", help="downloaded CIFAR-10 copy or imagefolder root (data.data_dir)")
    parser.add_argument("--epochs", type=int, help="number of epochs (train.epochs)")
    parser.add_argument("--arch", help="architecture: bn_cnn, resnet9 or plain_cnn (model.arch)")
    parser.add_argument("--batch-size", type=int, help="images per step (train.batch_size)")
    parser.add_argument("--seed", type=int, help="seed for data order, augmentation, init (train.seed)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config key, repeatable (e.g. --set optim.lr=0.05)")
    parser.add_argument("--run-dir", type=Path, required=True, help="directory for this run's outputs")


def resolve_config(args: argparse.Namespace, base: Config | None = None) -> Config:
    config = base or Config()
    if args.config is not None:
        config = config_mod.load(args.config, config)
    flags = {
        "data.dataset": args.dataset,
        "data.data_dir": args.data_dir,
        "train.epochs": args.epochs,
        "model.arch": args.arch,
        "train.batch_size": args.batch_size,
        "train.seed": args.seed,
    }
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    return config_mod.apply_overrides(config, overrides + list(args.overrides))


def _run_train(args: argparse.Namespace) -> int:
    base = None
    if args.resume and (args.run_dir / run_files.CONFIG_FILE).is_file():
        base = run_files.read_config(args.run_dir)  # resume: the run's own settings unless told otherwise
    config = resolve_config(args, base)
    train(config, args.run_dir, resume=args.resume)
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    evaluate_run(args.run_dir)
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    sweep(config, args.param, parse_values(args.values), args.run_dir, index=args.index)
    return 0


def _run_export(args: argparse.Namespace) -> int:
    # Imported when exporting, not at the top: the export needs TensorFlow, which the GPU machines
    # that train under JAX lack (tests/trainer/test_jax_backend.py). A broken export fails here, loudly.
    from trainer.export.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Train, evaluate and export "
                                     "CIFAR-10 classifiers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,sweep,export}")

    p = sub.add_parser("train", help="train a model into --run-dir (checkpoints, best model, reports)")
    _add_config_arguments(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its last checkpoint (fresh start if none)")
    p.set_defaults(handler=_run_train)

    p = sub.add_parser("evaluate", help="evaluate --run-dir/model.keras on the test split; write reports")
    p.add_argument("--run-dir", type=Path, required=True, help="a finished training run directory")
    p.set_defaults(handler=_run_evaluate)

    p = sub.add_parser("sweep", help="train once per value of one config parameter; summary table and plot")
    _add_config_arguments(p)
    p.add_argument("--param", required=True, help="config key to vary, e.g. model.dropout")
    p.add_argument("--values", required=True, help="comma-separated values, e.g. 0.0,0.1,0.2")
    p.add_argument("--index", type=int,
                   help="train only the value at this 0-based index, then merge the summary from every "
                        "finished run (one index per pod of an Indexed Job: $JOB_COMPLETION_INDEX)")
    p.set_defaults(handler=_run_sweep)

    export_arguments.register(sub, handler=_run_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError, RuntimeError) as exc:
        # Data, resume and file problems carry messages written for the user; no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted; continue with the same command plus --resume", file=sys.stderr)
        return 130
