"""`ranksearch export EXPERIMENT --trial ID --out FILE [--dense]`: a kept model out of an experiment,
as the ranksearch checkpoint (`ranksearch.load`) or, with --dense, the equivalent plain state_dict
that loads into the original architecture without ranksearch."""

from __future__ import annotations

import os
import shutil
import tempfile


def export(experiment_path: str, trial_id: str, out: str, dense: bool = False) -> str:
    import torch

    from ranksearch.models.checkpoint import dense_state_dict, read_payload

    from .saved_models import fetch

    with tempfile.TemporaryDirectory() as tmp:
        local = fetch(experiment_path, trial_id, tmp)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        if dense:
            payload = read_payload(local)
            torch.save(dense_state_dict(payload["state_dict"], payload["layers"]), out)
        else:
            read_payload(local)  # a file that is not a model is named here, not on the user's load
            shutil.copyfile(local, out)
    return out


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a Pareto-front trial's compressed model (or its dense state_dict)")
    p.add_argument("experiment", help="experiment directory (or URI) a search wrote")
    p.add_argument("--trial", required=True, help="trial_id (see pareto.parquet)")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--dense", action="store_true", help="the equivalent dense state_dict, loadable without ranksearch")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    path = export(args.experiment, args.trial, args.out, args.dense)
    kind = "dense state_dict" if args.dense else "compressed model (ranksearch.load)"
    print(f"{args.trial}: {kind} written to {path}")
    return 0
