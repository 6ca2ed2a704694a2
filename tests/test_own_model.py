"""`ranksearch.compress` on a user's own networks and data (tests/user_project, with its own `models/`)."""

from __future__ import annotations

import inspect
import os
import sys

import pytest
import torch
from torch import nn

import ranksearch
from conftest import REPO

PROJECT = os.path.join(REPO, "tests", "user_project")
CHANCE = 0.25  # four classes, balanced


@pytest.fixture(scope="module")
def project():
    """The fixture project importable as a user script sees it: its `models` is its own."""
    saved = {k: v for k, v in sys.modules.items() if k == "models" or k.startswith("models.") or k == "data"}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, PROJECT)
    import data
    import models
    import models.nets

    assert models.OWNER == "user_project"
    yield models.nets, data
    sys.path.remove(PROJECT)
    for k in [k for k in sys.modules if k == "models" or k.startswith("models.") or k == "data"]:
        del sys.modules[k]
    sys.modules.update(saved)


@pytest.fixture(scope="module")
def datasets(project):
    _, data = project
    return {"text": data.load("text"), "cnn": data.load("images")}


def _net(project, name):
    nets, _ = project
    torch.manual_seed(0)
    return nets.TextClassifier() if name == "text" else nets.SmallCNN()


@pytest.mark.parametrize("name", ["text", "cnn"])
@pytest.mark.parametrize("fmt", ["tt", "tucker"])
@pytest.mark.parametrize("method", ["bayesian", "l0", "lwiq", "fixed", "posthoc"])
def test_every_method_meets_the_budget_keeps_the_signature_and_learns(project, datasets, name, fmt, method):
    torch.set_num_threads(1)
    model, d = _net(project, name), datasets[name]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = {"finetune_epochs": 1} if method == "posthoc" else None
    result = ranksearch.compress(model, d["train"], d["val"], method=method, format=fmt, budget=0.1, epochs=4,
                                 progress=False, train=train)
    rec = result.record
    assert rec["budget_met"] and 0 < rec["tensorized_params"] <= rec["budget_params"]
    assert rec["budget_params"] == int(0.1 * rec["tensorized_dense_params"])
    assert rec["accuracy"] > 2 * CHANCE, rec["accuracy"]
    assert rec["method"] == method and rec["format"] == fmt and rec["metric"] == "accuracy"
    assert set(rec["ranks"]) and all(layer["format"] == fmt for layer in rec["layers"])
    # same forward signature and outputs of the same shape; the user's model is untouched
    assert inspect.signature(result.model.forward) == inspect.signature(model.forward)
    x = d["val"][0][0]
    assert result.model(x).shape == model(x).shape
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, ranksearch.FactorizedLayer) for m in model.modules())


def test_skipped_layers_are_listed_with_their_reason(project, datasets):
    """MultiheadAttention stays dense whole (its forward reads out_proj.weight as a tensor); a
    head under min_params is named too; the encoder's eval fast path still works."""
    d = datasets["text"]
    result = ranksearch.compress(_net(project, "text"), d["train"], d["val"], method="fixed", format="tt",
                                 budget=0.2, epochs=1, progress=False)
    skipped = {s["layer"]: s["reason"] for s in result.record["skipped"]}
    assert "MultiheadAttention" in skipped["encoder.layers.0.self_attn"]
    assert "min_params" in skipped["head"]
    assert set(result.record["ranks"]) == {"embed", "encoder.layers.0.linear1", "encoder.layers.0.linear2"}
    assert type(result.model.encoder.layers[0].self_attn.out_proj) is not ranksearch.FactorizedLinear
    with torch.no_grad():  # eval + no_grad is where the fused fast path would read linear1.weight
        out = result.model.eval()(d["val"][0][0])
    assert out.shape == (32, 4)
    excluded = ranksearch.compress(_net(project, "text"), d["train"], d["val"], method="fixed", format="tt",
                                   budget=0.2, epochs=1, progress=False, exclude=["embed"])
    assert "embed" not in excluded.record["ranks"]
    assert {"layer": "embed", "type": "Embedding", "reason": "matched by exclude"} in excluded.record["skipped"]


def test_tied_weights_are_not_untied(project, datasets):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.mix = nn.Embedding(64, 32), nn.Linear(32, 64)
            self.out = nn.Linear(32, 64, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, tokens):
            return self.out(torch.relu(self.mix(self.embed(tokens).mean(1)))[:, :32])[:, :4]

    d = datasets["text"]
    result = ranksearch.compress(Tied(), d["train"], d["val"], method="fixed", format="tt", budget=0.5, epochs=1,
                                 progress=False)
    reasons = {s["layer"]: s["reason"] for s in result.record["skipped"]}
    assert "shared with out" in reasons["embed"] and "shared with embed" in reasons["out"]
    assert list(result.record["ranks"]) == ["mix"]


@pytest.fixture(scope="module")
def trained_text(project, datasets):
    """The text classifier trained briefly (dense), as a user would hold it."""
    d = datasets["text"]
    torch.manual_seed(0)
    result = ranksearch.compress(_net(project, "text"), d["train"], d["val"], method="dense", epochs=3,
                                 progress=False, train={"lr": 3e-3})
    assert result.record["accuracy"] > 0.9
    return result.model, result.record["accuracy"]


@pytest.mark.parametrize("method", ["bayesian", "l0", "lwiq", "fixed"])
def test_pretrained_start_begins_near_the_trained_accuracy(datasets, trained_text, method):
    """Before any training, a pretrained start is the trained model minus the decomposition
    error; a random start is at chance. lwiq and fixed select without training, so with
    epochs=0 their result is that start (lwiq: decomposed afresh at its allocated ranks)."""
    model, trained = trained_text
    d = datasets["text"]
    common = dict(method=method, format="tt", budget=0.5, epochs=0, progress=False)
    pre = ranksearch.compress(model, d["train"], d["val"], init="pretrained", **common).record
    rand = ranksearch.compress(model, d["train"], d["val"], init="random", **common).record
    assert pre["dense_metric"] == pytest.approx(trained)
    assert pre["budget_met"] and pre["init"] == "pretrained"
    assert pre["start_metrics"]["accuracy"] >= trained - 0.15, (pre["start_metrics"], trained)
    assert rand["start_metrics"]["accuracy"] < CHANCE + 0.2
    if method in ("lwiq", "fixed"):
        assert pre["accuracy"] >= trained - 0.15, (pre["accuracy"], trained)
    assert rand["dense_metric"] is None


def test_save_load_and_dense_export(project, datasets, tmp_path):
    d = datasets["cnn"]
    result = ranksearch.compress(_net(project, "cnn"), d["train"], d["val"], method="lwiq", format="tt", budget=0.2,
                                 epochs=2, progress=False)
    path = tmp_path / "cnn.pt"
    result.save(str(path))
    x = d["val"][0][0]
    with torch.no_grad():
        expected = result.model(x)
    with pytest.raises(ValueError, match="pass model="):
        ranksearch.load(str(path))
    loaded = ranksearch.load(str(path), model=_net(project, "cnn"))
    assert loaded.ranksearch_record["ranks"] == result.record["ranks"]
    with torch.no_grad():
        assert torch.allclose(loaded(x), expected, atol=1e-5)
        plain = _net(project, "cnn")
        plain.load_state_dict(result.dense_state_dict())  # the original architecture, no factorized layers
        assert torch.allclose(plain.eval()(x), expected, atol=1e-4)
    loaded_by_path = ranksearch.load(str(path), model="models.nets:build_cnn")
    with torch.no_grad():
        assert torch.allclose(loaded_by_path(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="submodule|do not fit"):
        ranksearch.load(str(path), model=_net(project, "text"))


def test_generators_dict_batches_step_and_a_custom_metric(project, datasets):
    """Batches that are not (x, y): step() computes the loss, the metric reads the dicts; a
    generator is read once and replayed every epoch."""
    d = datasets["cnn"]

    def as_dicts(batches):
        return ({"image": x, "label": y} for x, y in batches)

    def step(model, batch):
        return nn.functional.cross_entropy(model(batch["image"]), batch["label"])

    @torch.no_grad()
    def error_rate(model, batches):
        wrong = total = 0
        for b in batches:
            wrong += int((model(b["image"]).argmax(1) != b["label"]).sum())
            total += len(b["label"])
        return wrong / total

    result = ranksearch.compress(_net(project, "cnn"), as_dicts(d["train"]), lambda: as_dicts(d["val"]), method="l0",
                                 format="tt", budget=0.2, epochs=3, step=step, metric=error_rate, metric_mode="min",
                                 progress=False)
    rec = result.record
    assert rec["metric"] == "error_rate" and rec["metric_mode"] == "min" and "accuracy" not in rec
    assert rec["error_rate"] < 0.5 and rec["epochs_done"] == 3 and rec["budget_met"]


@pytest.mark.parametrize("kwargs, message", [
    ({"model": "not a module"}, "model: expected a torch.nn.Module"),
    ({"method": "magic"}, "method: unknown method 'magic'"),
    ({"format": "qr"}, "format: unknown format 'qr'"),
    ({"init": "trained"}, "init: expected one of random, pretrained"),
    ({"train_data": 3}, "train_data: expected an iterable of batches"),
    ({"budget": 2.5}, "budget: fraction 2.5 is outside"),
    ({"include": ["nothing*"]}, "model: no layer can be factorized"),
])
def test_bad_arguments_are_clear_errors(project, datasets, kwargs, message):
    d = datasets["cnn"]
    args = {"model": _net(project, "cnn"), "train_data": d["train"], "val_data": d["val"], "method": "fixed",
            "format": "tt", "budget": 0.2, "epochs": 1, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ranksearch.compress(args.pop("model"), args.pop("train_data"), args.pop("val_data"), **args)


def test_shapes_set_a_layers_modes_and_a_bad_one_fails_before_any_training(project, datasets):
    d = datasets["cnn"]
    shapes = {"fc": {"in_shape": [4, 4, 16], "out_shape": [4, 4, 4]}}
    result = ranksearch.compress(_net(project, "cnn"), d["train"], d["val"], method="l0", format="ttm", budget=0.3,
                                 epochs=2, shapes=shapes, progress=False)
    layers = {layer["layer"]: layer["tensor_shape"] for layer in result.record["layers"]}
    assert layers["fc"] == [4, 4, 4, 4, 4, 16] and result.record["budget_met"]
    epochs = []
    with pytest.raises(ValueError, match=r"shapes.fc.out_shape: the product of \[4, 4\] is 16, smaller than 64"):
        ranksearch.compress(_net(project, "cnn"), d["train"], d["val"], method="posthoc", format="ttm", budget=0.3,
                            epochs=2, shapes={"fc": {"in_shape": [16, 16], "out_shape": [4, 4]}}, progress=False,
                            on_epoch=epochs.append)
    assert epochs == []  # posthoc trains dense first: the shapes were checked before it


def test_every_method_name_has_one_strategy():
    """fit and compress run every method, the baselines included, through one registry."""
    from ranksearch.models.rank_selection.hyperparams import METHODS
    from ranksearch.models.strategies import STRATEGIES

    assert set(STRATEGIES) == set(METHODS)
    assert {name for name, s in STRATEGIES.items() if not s.compresses} == {"dense"}
