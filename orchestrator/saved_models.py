"""Trained models kept in an experiment: `models/<trial_id>.pt` (weights_only checkpoints, see
models/checkpoint.py). Every finished trial writes its model; once the reports exist, only
the models of Pareto-front trials are kept (adding trials can only push old ones off a front,
never onto it, so a resumed search loses nothing it will need). Object-store experiments are
written through pyarrow.fs like the records."""

from __future__ import annotations

import os
import tempfile

import pyarrow.fs as pafs

from .records import is_uri

SUFFIX = ".pt"


def _fs(experiment_path: str):
    if is_uri(experiment_path):
        fs, root = pafs.FileSystem.from_uri(str(experiment_path))
        return fs, root.rstrip("/")
    return pafs.LocalFileSystem(), str(experiment_path).rstrip("/")


def model_path(experiment_path: str, trial_id: str) -> str:
    return f"{str(experiment_path).rstrip('/')}/models/{trial_id}{SUFFIX}"


def save_trial_model(experiment_path: str, trial_id: str, write) -> str:
    """`write(local_path)` writes the checkpoint; it lands at model_path (uploaded for a URI)."""
    path = model_path(experiment_path, trial_id)
    if not is_uri(experiment_path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write(path)
        return path
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, f"{trial_id}{SUFFIX}")
        write(local)
        fs, root = _fs(experiment_path)
        fs.create_dir(f"{root}/models", recursive=True)
        pafs.copy_files(local, f"{root}/models/{trial_id}{SUFFIX}", destination_filesystem=fs)
    return path


def saved_trials(experiment_path: str) -> list[str]:
    fs, root = _fs(experiment_path)
    selector = pafs.FileSelector(f"{root}/models", allow_not_found=True)
    return sorted(info.base_name[: -len(SUFFIX)] for info in fs.get_file_info(selector)
                  if info.base_name.endswith(SUFFIX) and not info.base_name.startswith("."))


def keep_only(experiment_path: str, trial_ids) -> None:
    """Delete the saved models of trials not in `trial_ids` (the Pareto fronts)."""
    fs, root = _fs(experiment_path)
    keep = set(trial_ids)
    for trial_id in saved_trials(experiment_path):
        if trial_id not in keep:
            fs.delete_file(f"{root}/models/{trial_id}{SUFFIX}")


def fetch(experiment_path: str, trial_id: str, directory: str) -> str:
    """A local path holding the trial's model (downloaded into `directory` for a URI)."""
    if trial_id not in saved_trials(experiment_path):
        kept = saved_trials(experiment_path)
        raise FileNotFoundError(f"--trial: no saved model for {trial_id!r} in {experiment_path} (models are kept for "
                                f"Pareto-front trials: {', '.join(kept) or 'none saved'})")
    if not is_uri(experiment_path):
        return model_path(experiment_path, trial_id)
    fs, root = _fs(experiment_path)
    local = os.path.join(directory, f"{trial_id}{SUFFIX}")
    pafs.copy_files(f"{root}/models/{trial_id}{SUFFIX}", local, source_filesystem=fs)
    return local
