"""`ranksearch` command line. Bad input exits with code 2 and a one-line error naming the field."""

from __future__ import annotations

import argparse
import json
import sys

EXIT_USAGE = 2


def _budget(text: str):
    """'0.1' is a fraction of the dense tensorized parameters; '12000' an absolute count."""
    try:
        return int(text) if text.isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction like 0.1 or a parameter count like 12000, got {text!r}")


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
    p.add_argument("--epochs", type=int)
    p.add_argument("--finetune-epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--max-rank", type=int)
    p.add_argument("--optimizer", choices=("adam", "sgd"))
    p.add_argument("--table-optimizer", choices=("auto", "none", "rowwise_adagrad", "sgd", "adam"),
                   help="embedding tables: updated in backward on touched rows only (auto: DLRM rowwise_adagrad)")
    p.add_argument("--table-lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-train", type=int, help="use at most this many training samples")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="method hyperparameter (repeatable)")
    p.add_argument("--dataset-option", action="append", metavar="NAME=VALUE",
                   help="dataset loader option, e.g. num_samples=20000 for synthetic-criteo (repeatable)")
    p.add_argument("--model-option", action="append", metavar="NAME=VALUE",
                   help="model builder option, e.g. embedding_dim=64 or tensorize_mlp=true for dlrm (repeatable)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", metavar="OUT", help="write the result record here")
    p.add_argument("--save", metavar="PATH", help="save the compressed model (torch.load weights_only=True)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from ranksearch.models.train import fit

    train = {k: v for k, v in {
        "epochs": args.epochs, "finetune_epochs": args.finetune_epochs, "batch_size": args.batch_size,
        "lr": args.lr, "max_rank": args.max_rank, "optimizer": args.optimizer, "seed": args.seed,
        "table_optimizer": args.table_optimizer, "table_lr": args.table_lr,
    }.items() if v is not None}
    options = _key_values(args.dataset_option, "--dataset-option")
    if args.max_train:
        options["max_train"] = args.max_train
    record = fit(model=args.model, dataset=args.dataset, method=args.method, format=args.format,
                 budget=args.budget, train=train, method_params=_key_values(args.param, "--param"),
                 device=args.device, dataset_options=options, model_options=_key_values(args.model_option, "--model-option"),
                 progress=not args.quiet, save=args.save)
    _print_record(record)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2, default=str)
    return 0


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
