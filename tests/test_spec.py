"""Search specs: presets load, defaults fill in, the grid is right, and every mistake is named."""

import copy
import dataclasses
import json

import pytest

from ranksearch.models.rank_selection.hyperparams import METHOD_DEFAULTS, TRAIN_DEFAULTS
from ranksearch.search_spaces import Spec, SpecError, is_distribution, list_presets, load_spec, preset_path
from ranksearch.models.data import DATASETS as DATASET_KINDS
from ranksearch.search_spaces.schema import DATASETS, SECTIONS, TRAIN_BOUNDS

BASE = {
    "models": ["mlp"],
    "dataset": "digits",
    "formats": ["tt"],
    "methods": {"l0": {"lam": {"loguniform": [0.01, 1.0]}}, "fixed": {}},
    "budgets": [0.1, 0.2, 0.5],
}
DROP = object()


def spec_with(**sections):
    """BASE with whole sections replaced (DROP removes one)."""
    raw = copy.deepcopy(BASE)
    for key, value in sections.items():
        if value is DROP:
            raw.pop(key)
        else:
            raw[key] = value
    return raw


def errors_of(raw) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(raw)
    return info.value.errors


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads_and_round_trips(name):
    spec = load_spec(name)
    assert spec.name == name
    assert spec.cells()
    assert load_spec(json.loads(json.dumps(spec.to_dict()))) == spec


def test_the_documented_presets_exist():
    expected = {"digits-quick", "mnist14-demo", "mnist-mlp", "mnist-lenet5", "cifar10-resnet56", "criteo-dlrm", "synthetic-dlrm"}
    assert expected <= set(list_presets())


def test_preset_by_name_or_path_is_the_same_spec():
    assert load_spec(preset_path("digits-quick")) == load_spec("digits-quick")
    assert load_spec(str(preset_path("digits-quick"))) == load_spec("digits-quick")


def test_unknown_preset_suggests_the_close_one():
    (error,) = errors_of("digits-quik")
    assert error.startswith("spec:") and "did you mean 'digits-quick'?" in error


def test_defaults_filled():
    spec = load_spec(BASE)
    assert spec.name == "search" and spec.storage is None and spec.dataset_options == {}
    assert spec.train == {k: v for k, v in TRAIN_DEFAULTS.items() if k != "seed"}
    assert spec.search == {
        "searcher": "grid",
        "samples_per_cell": 1,
        "scheduler": "fifo",
        "asha_metric": None,
        "max_concurrent": None,
        "time_budget_s": None,
        "seeds": [0],
        "max_failures": 1,
    }
    assert spec.resources == {"cpu": 1.0, "gpu": 0.0, "workers": 1}
    assert spec.objectives == [{"metric": "accuracy", "mode": "max"}, {"metric": "params", "mode": "min"}]
    assert spec.method_params("l0") == {**METHOD_DEFAULTS["l0"], "lam": {"loguniform": [0.01, 1.0]}}
    assert spec.method_params("fixed") == {}


def test_dlrm_defaults_to_auc_and_objectives_take_their_usual_mode():
    spec = load_spec(spec_with(models=["dlrm"], dataset="synthetic-criteo"))
    assert spec.objectives[0] == {"metric": "auc", "mode": "max"}
    spec = load_spec(spec_with(objectives=["accuracy", {"metric": "wall_time_s"}]))
    assert spec.objectives == [{"metric": "accuracy", "mode": "max"}, {"metric": "wall_time_s", "mode": "min"}]


def test_cells_of_digits_quick():
    spec = load_spec("digits-quick")
    cells = spec.cells()
    dense = [c for c in cells if c["method"] == "dense"]
    assert dense == [{"model": "mlp", "format": None, "method": "dense", "budget": None}]
    compressed = {(c["method"], c["format"], c["budget"]) for c in cells if c["method"] != "dense"}
    methods = [m for m in spec.methods if m != "dense"]
    assert {"bayesian", "l0", "lwiq", "fixed"} <= set(methods)
    assert compressed == {(m, f, b) for m in methods for f in spec.formats for b in spec.budgets}
    assert len(cells) == len(compressed) + 1 == len(methods) * 2 * 3 + 1
    assert all(c["model"] == "mlp" for c in cells)


def test_dense_only_needs_no_formats_or_budgets():
    spec = load_spec(spec_with(models=["mlp", "lenet5"], methods=["dense"], formats=DROP, budgets=DROP))
    assert [c["model"] for c in spec.cells()] == ["mlp", "lenet5"]


def test_absolute_budgets_and_distributions_round_trip():
    raw = spec_with(
        budgets=[0.1, {"params": 12000}],
        train={"lr": {"loguniform": [1e-4, 1e-2]}, "batch_size": {"choice": [32, 64]}},
        search={"searcher": "optuna", "samples_per_cell": 4},
        storage="s3://bucket/ranksearch",
    )
    spec = load_spec(raw)
    assert spec.budgets == [0.1, {"params": 12000}]
    assert [c["budget"] for c in spec.cells() if c["method"] == "fixed"] == [0.1, {"params": 12000}]
    assert is_distribution(spec.train["lr"]) and not is_distribution(spec.train["epochs"])
    assert load_spec(json.loads(json.dumps(spec.to_dict()))) == spec


def test_lone_values_stand_for_lists():
    spec = load_spec(spec_with(models="mlp", formats="tt", budgets=0.5))
    assert (spec.models, spec.formats, spec.budgets) == (["mlp"], ["tt"], [0.5])


def test_yaml_reads_exponent_without_dot_as_float(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("models: [mlp]\ndataset: digits\nformats: [tt]\nmethods: [fixed]\nbudgets: [0.1]\ntrain: {lr: 3e-4}\n")
    spec = load_spec(path)
    assert spec.train["lr"] == pytest.approx(3e-4) and spec.name == "mine"


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("models: [mlp\n")
    with pytest.raises(SpecError, match="broken.yaml"):
        load_spec(path)


def test_asha_metric_defaults_to_the_first_objective():
    spec = load_spec(spec_with(search={"scheduler": "asha"}))
    assert spec.search["asha_metric"] == "accuracy"


def test_every_error_is_reported_at_once():
    errors = errors_of(spec_with(models=["mpl"], budgets=[2.0], train={"epochs": "five"}, resources={"cpu": -1}))
    assert [e.split(":")[0] for e in errors] == ["models[0]", "budgets[0]", "train.epochs", "resources.cpu"]


def test_method_params_of_a_method_not_in_the_spec():
    with pytest.raises(KeyError, match="lwiq"):
        load_spec(BASE).method_params("lwiq")


# (sections to replace, the error expected: a prefix "field: message..." of one error line)
INVALID = {
    "unknown top-level key": ({"trian": {}}, "trian: unknown key; did you mean 'train'?"),
    "unknown train key": ({"train": {"epoch": 5}}, "train.epoch: unknown key; did you mean 'epochs'?"),
    "unknown search key": ({"search": {"sampels_per_cell": 2}}, "search.sampels_per_cell: unknown key; did you mean 'samples_per_cell'?"),
    "epochs not a number": ({"train": {"epochs": "five"}}, "train.epochs: expected a positive integer, got 'five'"),
    "epochs a float": ({"train": {"epochs": 2.5}}, "train.epochs: expected a positive integer, got 2.5"),
    "negative lr": ({"train": {"lr": -0.1}}, "train.lr: expected a positive number, got -0.1"),
    "train.seed": ({"train": {"seed": 3}}, "train.seed: set seeds with search.seeds"),
    "unknown model": ({"models": ["mpl"]}, "models[0]: expected one of: mlp, lenet5, resnet20, resnet32, resnet56, dlrm, got 'mpl'; did you mean 'mlp'?"),
    "no models": ({"models": DROP}, "models: required"),
    "duplicate model": ({"models": ["mlp", "mlp"]}, "models[1]: duplicate of models[0]"),
    "unknown format": ({"formats": ["tt", "tensor-train"]}, "formats[1]: expected one of: cp, tucker, tt, ttm, got 'tensor-train'"),
    "no formats": ({"formats": DROP}, "formats: required"),
    "unknown method": ({"methods": {"bayes": {}}}, "methods.bayes: expected one of: bayesian, l0, lwiq, fixed, posthoc, dense, got 'bayes'; did you mean 'bayesian'?"),
    "no methods": ({"methods": {}}, "methods: required"),
    "unknown hyperparameter": ({"methods": {"l0": {"lamda": 0.1}}}, "methods.l0.lamda: unknown hyperparameter; did you mean 'lam'?"),
    "hyperparameter of a method without any": ({"methods": {"fixed": {"lam": 1}}}, "methods.fixed.lam: unknown hyperparameter; none are accepted here"),
    "hyperparameter of the wrong type": ({"methods": {"l0": {"freeze_at_target": "yes please"}}}, "methods.l0.freeze_at_target: expected true or false"),
    "budget above 1": ({"budgets": [0.1, 0.2, 1.5]}, "budgets[2]: 1.5 is outside (0, 1]; an integer >= 2 or {params: N} is a parameter count"),
    "budget of 0": ({"budgets": [0]}, "budgets[0]: 0 is outside (0, 1]"),
    "budget not a number": ({"budgets": ["10%"]}, "budgets[0]: expected a fraction in (0, 1], or a parameter count (an integer >= 2 or {params: N}), got '10%'"),
    "absolute budget of 0": ({"budgets": [{"params": 0}]}, "budgets[0].params: expected a positive integer, got 0"),
    "absolute budget misspelt": ({"budgets": [{"param": 100}]}, "budgets[0].param: unknown key; did you mean 'params'?"),
    "duplicate budget": ({"budgets": [0.1, 0.1]}, "budgets[1]: duplicate of budgets[0]"),
    "no budgets": ({"budgets": DROP}, "budgets: required"),
    "distribution lo >= hi": ({"methods": {"l0": {"lam": {"uniform": [1.0, 0.5]}}}}, "methods.l0.lam.uniform: lo must be below hi, got [1.0, 0.5]"),
    "loguniform from 0": ({"methods": {"bayesian": {"kl_weight": {"loguniform": [0, 1e-3]}}}}, "methods.bayesian.kl_weight.loguniform: loguniform needs lo > 0"),
    "unknown distribution": ({"methods": {"l0": {"lam": {"log_uniform": [0.1, 1]}}}}, "methods.l0.lam: unknown distribution 'log_uniform'; did you mean 'loguniform'?"),
    "distribution with two keys": ({"train": {"lr": {"uniform": [0.1, 1], "int": [1, 2]}}}, "train.lr: a distribution has exactly one key"),
    "continuous distribution on an integer": ({"train": {"epochs": {"uniform": [1, 5]}}}, "train.epochs: 'uniform' does not fit a field that expects a positive integer; search it with {int: [lo, hi]}"),
    "distribution bound out of range": ({"train": {"lr": {"uniform": [-1.0, 1.0]}}}, "train.lr.uniform[0]: expected a positive number, got -1.0"),
    "empty choice": ({"train": {"batch_size": {"choice": []}}}, "train.batch_size.choice: expected a non-empty list"),
    "unknown searcher": ({"search": {"searcher": "optunaa"}}, "search.searcher: expected one of: grid, optuna, got 'optunaa'; did you mean 'optuna'?"),
    "unknown scheduler": ({"search": {"scheduler": "hyperband"}}, "search.scheduler: expected one of: fifo, asha, got 'hyperband'"),
    "optuna without distributions": ({"methods": ["fixed"], "search": {"searcher": "optuna"}}, "search.searcher: optuna needs at least one distribution"),
    "samples without distributions": ({"methods": ["fixed"], "search": {"samples_per_cell": 3}}, "search.samples_per_cell: 3 samples per cell but no distribution"),
    "asha metric not an objective": ({"search": {"scheduler": "asha", "asha_metric": "auc"}}, "search.asha_metric: 'auc' is not an objective (accuracy, params)"),
    "asha metric without asha": ({"search": {"asha_metric": "accuracy"}}, "search.asha_metric: only used with scheduler: asha"),
    "no seeds": ({"search": {"seeds": []}}, "search.seeds: expected at least one value"),
    "negative seed": ({"search": {"seeds": [0, -1]}}, "search.seeds[1]: expected a non-negative integer, got -1"),
    "negative cpu": ({"resources": {"cpu": -1}}, "resources.cpu: expected a non-negative number, got -1"),
    "negative gpu": ({"resources": {"gpu": -0.5}}, "resources.gpu: expected a non-negative number, got -0.5"),
    "zero workers": ({"resources": {"workers": 0}}, "resources.workers: expected a positive integer, got 0"),
    "no cpu and no gpu": ({"resources": {"cpu": 0}}, "resources: a trial must ask for some cpu or gpu"),
    "unknown metric": ({"objectives": [{"metric": "acc", "mode": "max"}]}, "objectives[0].metric: expected one of: accuracy,"),
    "unknown mode": ({"objectives": [{"metric": "accuracy", "mode": "maximize"}]}, "objectives[0].mode: expected one of: max, min, got 'maximize'"),
    "no objectives": ({"objectives": []}, "objectives: list at least one objective"),
    "duplicate objective": ({"objectives": ["params", "params"]}, "objectives[1]: duplicate of objectives[0]"),
    "auc for an image model": ({"objectives": ["auc"]}, "objectives[0].metric: 'auc' is not reported by image models"),
    "accuracy for dlrm": ({"models": ["dlrm"], "dataset": "synthetic-criteo", "objectives": ["accuracy"]}, "objectives[0].metric: 'accuracy' is not reported by DLRM runs"),
    "dlrm on digits": ({"models": ["dlrm"], "objectives": ["params"]}, "dataset: 'digits' does not fit model 'dlrm', which reads criteo:FILE_OR_DIR, synthetic-criteo"),
    "image model on criteo": ({"dataset": "criteo:data/criteo"}, "dataset: 'criteo:data/criteo' does not fit model 'mlp', which reads digits, mnist14, mnist:DIR, cifar10:DIR"),
    "unknown dataset": ({"dataset": "mnsit:data/mnist"}, "dataset: expected one of: digits, mnist14, mnist, cifar10, criteo, synthetic-criteo, got 'mnsit'; did you mean 'mnist'?"),
    "dataset without its location": ({"dataset": "mnist"}, "dataset: 'mnist' needs a location: mnist:DIR"),
    "dataset with a stray location": ({"dataset": "digits:data"}, "dataset: 'digits' takes no location"),
    "seed in dataset options": ({"dataset_options": {"max_train": 100, "seed": 1}}, "dataset_options.seed: set seeds with search.seeds"),
    "dataset options not a mapping": ({"dataset_options": [1]}, "dataset_options: expected a mapping"),
    "train not a mapping": ({"train": [5]}, "train: expected a mapping"),
    "name with a space": ({"name": "my search"}, "name: expected letters, digits"),
    "storage not a string": ({"storage": 5}, "storage: expected a string, got 5"),
    "shapes of another model": ({"shapes": {"lenet5": {"1": {"in_shape": [8, 8]}}}}, "shapes.lenet5: not one of the spec's models (mlp)"),
    "shapes not per model": ({"shapes": [{"in_shape": [8, 8]}]}, "shapes: expected a mapping model -> layer name"),
    "shapes of a layer not a mapping": ({"shapes": {"mlp": {"1": [8, 8]}}}, "shapes.mlp.1: expected a mapping with in_shape, out_shape, shape"),
    "shape key misspelt": ({"shapes": {"mlp": {"1": {"in_shapes": [8, 8]}}}}, "shapes.mlp.1.in_shapes: unknown key; did you mean 'in_shape'?"),
    "shape factor of 0": ({"shapes": {"mlp": {"1": {"out_shape": [0, 8]}}}}, "shapes.mlp.1.out_shape: expected a list of positive integers, got [0, 8]"),
    "table shape flat": ({"shapes": {"mlp": {"1": {"shape": [4, 8]}}}}, "shapes.mlp.1.shape: expected [[row factors], [dim factors]], got [4, 8]"),
}


@pytest.mark.parametrize("sections, expected", INVALID.values(), ids=INVALID.keys())
def test_invalid_specs_name_the_field(sections, expected):
    errors = errors_of(spec_with(**sections))
    assert any(e.startswith(expected) for e in errors), errors


def test_shapes_round_trip_and_default_to_none():
    shapes = {"mlp": {"1": {"in_shape": [8, 8], "out_shape": [16, 32]}}}
    spec = load_spec(spec_with(shapes=shapes))
    assert spec.shapes == shapes and load_spec(spec.to_dict()) == spec
    assert load_spec(spec_with()).shapes == {}


def test_a_spec_must_be_a_mapping_or_a_path():
    assert errors_of(42) == ["spec: expected a YAML path, preset name or dict, got int"]
    assert errors_of(["not", "a", "mapping"])[0].startswith("spec: expected")


def test_spec_error_is_a_value_error_listing_every_line():
    with pytest.raises(ValueError) as info:
        load_spec(spec_with(models=["mpl"], budgets=[3.5]))
    message = str(info.value)
    assert "2 errors" in message and "models[0]:" in message and "budgets[0]:" in message


def test_check_resources_names_the_field():
    gpu_spec = load_spec(spec_with(resources={"cpu": 1, "gpu": 1}))
    with pytest.raises(SpecError) as info:
        gpu_spec.check_resources({"CPU": 2.0, "GPU": 0.0})
    (error,) = info.value.errors
    assert error.startswith("resources.gpu: a trial needs 1 GPU") and "offers 0" in error
    gpu_spec.check_resources({"CPU": 2.0, "GPU": 1.0})


def test_check_resources_counts_every_worker():
    spec = load_spec(spec_with(resources={"cpu": 1, "workers": 2}))
    spec.check_resources({"CPU": 2.0})
    spec = load_spec(spec_with(resources={"cpu": 1, "workers": 3}))
    with pytest.raises(SpecError, match=r"resources\.cpu: a trial needs 3 CPU \(cpu 1 x workers 3\)"):
        spec.check_resources({"CPU": 2.0})


def test_schema_tables_match_the_code():
    assert set(TRAIN_BOUNDS) <= set(TRAIN_DEFAULTS)
    assert tuple(DATASETS) == DATASET_KINDS
    assert tuple(f.name for f in dataclasses.fields(Spec)) == SECTIONS


def test_model_options_pass_through_but_not_what_the_grid_sets():
    spec = load_spec({**load_spec("synthetic-dlrm").to_dict(), "model_options": {"embedding_dim": 8}})
    assert spec.model_options == {"embedding_dim": 8}
    with pytest.raises(SpecError) as err:
        load_spec({**spec.to_dict(), "model_options": {"format": "tt", "max_rank": 4}})
    assert "model_options.format" in str(err.value) and "model_options.max_rank" in str(err.value)
