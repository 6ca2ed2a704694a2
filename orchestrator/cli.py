"""`ranksearch` command line. Bad input exits with code 2 and a one-line error naming the field."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

EXIT_USAGE = 2


def _budget(text: str):
    """'0.1' is a fraction of the dense tensorized parameters; '12000' (an integer >= 2) a count;
    the schema applies the same rule as to a spec's budgets."""
    try:
        return int(text) if text.isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction like 0.1 or a parameter count like 12000, got {text[:80]!r}")


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text[:80]!r}")
        return value

    return parse


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# schema path of a value -> the flag that set it, for error messages
FLAGS = {"models[0]": "--model", "formats[0]": "--format", "budgets[0]": "--budget", "dataset_options.": "--dataset-option ",
         "model_options.": "--model-option ", "dataset": "--dataset", "train.": "--", "shapes.": "--shape "}


def _key_values(pairs: list[str] | None, flag: str) -> dict:
    """NAME=VALUE pairs; values are read as JSON when they parse (numbers, true, lists), else strings."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag}: expected NAME=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _add_train(sub) -> None:
    from ranksearch.models.rank_selection.hyperparams import METHODS
    from ranksearch.models.registry import DATASETS
    from ranksearch.models.tensorized.names import FORMATS
    from ranksearch.models.zoo.names import MODELS

    p = sub.add_parser("train", help="train one model with one rank-selection method at one budget")
    p.add_argument("--model", default="mlp", choices=MODELS)
    p.add_argument("--dataset", default="digits", help=DATASETS.usage().replace(", ", " | "))
    p.add_argument("--method", default="fixed", choices=METHODS)
    p.add_argument("--format", default="tt", choices=FORMATS)
    p.add_argument("--budget", type=_budget, default=0.1, help="fraction of dense tensorized params, or a count")
    p.add_argument("--epochs", type=_count(1))
    p.add_argument("--finetune-epochs", type=_count(0))
    p.add_argument("--batch-size", type=_count(1))
    p.add_argument("--lr", type=float)
    p.add_argument("--max-rank", type=_count(1))
    p.add_argument("--optimizer", choices=("adam", "sgd"))
    p.add_argument("--table-optimizer", choices=("auto", "none", "rowwise_adagrad", "sgd", "adam"),
                   help="embedding tables: updated in backward on touched rows only (auto: DLRM rowwise_adagrad)")
    p.add_argument("--table-lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-train", type=_count(1), help="use at most this many training samples")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="method hyperparameter (repeatable)")
    p.add_argument("--dataset-option", action="append", metavar="NAME=VALUE",
                   help="dataset loader option, e.g. num_samples=20000 for synthetic-criteo (repeatable)")
    p.add_argument("--model-option", action="append", metavar="NAME=VALUE",
                   help="model builder option, e.g. embedding_dim=64 or tensorize_mlp=true for dlrm (repeatable)")
    p.add_argument("--shape", action="append", metavar="LAYER=JSON",
                   help='mode shapes of one layer, e.g. 1=\'{"in_shape": [4, 7, 4, 7], "out_shape": [4, 4, 8, 4]}\' (repeatable)')
    p.add_argument("--device", default="auto")
    p.add_argument("--json", metavar="OUT", help="write the result record here")
    p.add_argument("--save", metavar="PATH", help="save the compressed model (torch.load weights_only=True)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from ranksearch.models.train import fit

    train = {k: v for k, v in {
        "epochs": args.epochs, "finetune_epochs": args.finetune_epochs, "batch_size": args.batch_size,
        "lr": args.lr, "max_rank": args.max_rank, "optimizer": args.optimizer,
        "table_optimizer": args.table_optimizer, "table_lr": args.table_lr,
    }.items() if v is not None}
    options = _key_values(args.dataset_option, "--dataset-option")
    if args.max_train is not None:
        options["max_train"] = args.max_train
    method_params = _key_values(args.param, "--param")
    model_options = _key_values(args.model_option, "--model-option")
    shapes = _key_values(args.shape, "--shape") or None
    budget = _check_run(args, train, method_params, options, model_options, shapes)
    if args.seed is not None:
        train["seed"] = args.seed
    record = fit(model=args.model, dataset=args.dataset, method=args.method, format=args.format,
                 budget=budget, train=train, method_params=method_params,
                 device=args.device, dataset_options=options, model_options=model_options,
                 progress=not args.quiet, save=args.save, shapes=shapes)
    _print_record(record)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2, default=str)
    return 0


def _check_run(args, train: dict, method_params: dict, options: dict, model_options: dict, shapes: dict | None = None):
    """The spec schema's checks on the CLI's values (one rule for both), the preflight checks,
    device and output paths, all before training; returns the budget in `fit`'s terms."""
    from ranksearch.search_spaces import SpecError, load_spec

    from .plan import fit_budget
    from .preflight import preflight

    raw = {"name": "train", "models": [args.model], "dataset": args.dataset, "dataset_options": options,
           "model_options": model_options, "formats": [args.format], "methods": {args.method: method_params},
           "budgets": [args.budget], "train": train, "shapes": {args.model: shapes} if shapes else None}
    try:
        spec = load_spec(raw)
        preflight(spec)
    except SpecError as exc:
        raise ValueError("; ".join(_flag(line) for line in exc.errors)) from None
    if not DEVICE.fullmatch(args.device):
        raise ValueError(f"--device: expected auto, cpu, cuda, cuda:N or mps, got {args.device[:80]!r}")
    for flag, path in (("--json", args.json), ("--save", args.save)):
        if path:
            _check_output(flag, path)
    return None if args.method == "dense" else fit_budget(spec.budgets[0])


def _flag(line: str) -> str:
    """'train.lr: expected ...' -> '--lr: expected ...', and so on (see FLAGS)."""
    for prefix, flag in FLAGS.items():
        if line.startswith(prefix):
            where, sep, message = line.partition(": ")
            name = where[len(prefix):]
            if prefix == "train.":
                name = name.replace("_", "-")
            if prefix == "shapes.":  # shapes.MODEL.LAYER...: the CLI has one model
                name = name.partition(".")[2]
            return f"{flag}{name}{sep}{message}"
    if line.startswith("methods."):
        where, sep, message = line.partition(": ")
        key = where.split(".", 2)[2] if where.count(".") >= 2 else where
        return f"--param {key}{sep}{message}" if where.count(".") >= 2 else f"--method{sep}{message}"
    return line


def _check_output(flag: str, path: str) -> None:
    """A file the run writes at its end must be writable now: a run's result is never lost at the end."""
    target = Path(path).expanduser()
    if path.endswith(os.sep) or target.is_dir():
        raise ValueError(f"{flag}: {path} is a directory; expected a file path")
    parent = target.parent
    if not parent.is_dir():
        raise ValueError(f"{flag}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"{flag}: {path} is not writable")


def _print_record(record: dict) -> None:
    metric = "auc" if record.get("auc") is not None else "accuracy"
    print(f"{record['model']} {record['method']} {record['format'] or ''} budget={record['budget']}: "
          f"{metric} {record[metric]:.4f}  params {record['params']:,} / dense {record['dense_params']:,} "
          f"({record['compression']:.1f}x)  budget_met={record['budget_met']}  "
          f"rank search {record['rank_search_time_s']:.1f}s  wall {record['wall_time_s']:.1f}s")
    for layer, ranks in record["ranks"].items():
        print(f"  {layer}: ranks {ranks}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ranksearch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    from ranksearch.orchestrator import commands

    commands.add_commands(sub)
    from ranksearch.orchestrator.export import add_export

    add_export(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # our errors name the field; no traceback for bad input
        print(f"ranksearch {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
