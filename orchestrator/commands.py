"""Search-level subcommands of `ranksearch` (run, resume, report, validate, submit, demo)."""

from __future__ import annotations


def cmd_demo(args) -> int:
    """Dense vs compressed MLP on the bundled digits data."""
    from models.train import fit

    from .cli import _print_record

    train = {"epochs": 8, "finetune_epochs": 2, "max_rank": 8}
    dense = fit(model="mlp", dataset="digits", method="dense", train=train)
    _print_record(dense)
    compressed = fit(model="mlp", dataset="digits", method="bayesian", format="ttm", budget=0.1, train=train)
    _print_record(compressed)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="the quick demo on bundled digits (what `make demo` runs)")
    p.set_defaults(func=cmd_demo)
