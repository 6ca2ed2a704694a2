"""`compress`: a user's own network and data through the same strategies `fit` runs.

The user's model is never copied into the zoo: its Linear / Conv2d / Embedding / EmbeddingBag
layers are replaced in place on a deep copy, and every layer left dense is listed in the record
(`skipped`) with the reason. Choices:
- `nn.MultiheadAttention` is left whole: its forward hands `in_proj_weight` (a bare parameter)
  and `out_proj.weight` to `F.multi_head_attention_forward` as dense tensors, so a factorized
  `out_proj` would break it (or, materialized each call, compress nothing at run time).
- Weights shared by several layers (tied embeddings / heads) stay dense: factorizing one copy
  would silently untie them.
- `nn.TransformerEncoderLayer`'s fused inference fast path reads `linear1.weight` etc. as
  tensors; a layer holding factorized parts gets a no-op forward pre-hook (the documented
  condition that turns the fast path off) and its encoder `use_nested_tensor = False`, so
  eval runs the ordinary modules.
"""

from __future__ import annotations

import copy
import fnmatch
import time
from dataclasses import dataclass

from torch import nn

from ranksearch.models.tensorized import FORMATS, FactorizedLayer, factorized_layers, tensorize
from ranksearch.models.tensorized.convert import CONVERTIBLE, _supported

from .strategies import INITS, Run, get_strategy
from .tasks import BatchTask


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def plan_layers(model: nn.Module, *, include=None, exclude=None, min_params: int = 1024) -> tuple[list[str], list[dict]]:
    """Names of the layers to factorize, and {layer, type, reason} for every layer left dense."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, CONVERTIBLE):
            owners.setdefault(id(module.weight), []).append(name)
    targets, skipped, inside_attention = [], [], set()

    def skip(name, module, reason):
        skipped.append({"layer": name, "type": type(module).__name__, "reason": reason})

    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            inside_attention.update(f"{name}.{child}" if name else child for child, _ in module.named_modules() if child)
            skip(name, module, "MultiheadAttention passes in_proj_weight and out_proj.weight to "
                               "F.multi_head_attention_forward as dense tensors; left dense whole")
        elif not isinstance(module, CONVERTIBLE) or name in inside_attention:
            continue
        elif include is not None and not _matches(name, include):
            skip(name, module, "not matched by include")
        elif exclude and _matches(name, exclude):
            skip(name, module, "matched by exclude")
        elif not _supported(module):
            skip(name, module, "only Conv2d with groups=1 and zero padding given as numbers has a factorized form")
        elif len(owners[id(module.weight)]) > 1:
            others = [n for n in owners[id(module.weight)] if n != name]
            skip(name, module, f"weight shared with {', '.join(others)}; factorizing would untie it")
        elif module.weight.numel() < min_params:
            skip(name, module, f"{module.weight.numel()} weights, under min_params={min_params}")
        else:
            targets.append(name)
    return targets, skipped


def _no_fast_path(module, args):
    """Forward pre-hook whose presence turns off nn.TransformerEncoderLayer's fused fast path."""
    return None


def guard_fast_paths(net: nn.Module) -> None:
    """Fused transformer kernels read dense weight tensors; route layers holding factorized
    parts through their ordinary modules (see the module docstring)."""
    for module in net.modules():
        has_factorized = any(isinstance(m, FactorizedLayer) for m in module.modules())
        if not has_factorized:
            continue
        if isinstance(module, nn.TransformerEncoderLayer) and _no_fast_path not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_no_fast_path)
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False


@dataclass
class CompressResult:
    model: nn.Module  # compressed, at its pruned ranks, eval mode
    record: dict  # the `ranksearch train --json` fields, plus init, metric, skipped, dense_metric

    def save(self, path: str) -> None:
        """A file `ranksearch.load(path, model=<fresh instance>)` reads back (weights_only)."""
        from .checkpoint import save_compressed

        save_compressed(path, self.model, self.record, {}, source={"kind": "module", "class": _class_path(self.model)})

    def dense_state_dict(self) -> dict:
        """The equivalent dense state_dict: loads into the original architecture, no ranksearch needed."""
        from .checkpoint import dense_state_dict

        return dense_state_dict(self.model.state_dict(), _layer_specs(self.model))


def _class_path(model: nn.Module) -> str:
    return f"{type(model).__module__}:{type(model).__qualname__}"


def _layer_specs(net: nn.Module) -> dict:
    from .checkpoint import layer_specs

    return layer_specs(net)


def compress(model: nn.Module, train_data, val_data, *, method: str = "l0", format: str = "tt", budget=0.1,
             epochs: int = 5, init: str = "random", loss=None, metric=None, step=None, include=None, exclude=None,
             max_rank: int = 16, method_params: dict | None = None, device: str = "auto", progress: bool = True,
             train: dict | None = None, min_params: int = 1024, test_data=None, metric_name: str | None = None,
             metric_mode: str = "max", seed: int = 0, on_epoch=None, shapes: dict | None = None) -> CompressResult:
    """Compress `model` (left untouched) with `method` to `budget` in `format`; see README
    "Compress your own model". `epochs` is the total number of training epochs (`train` may set
    lr, optimizer, finetune_epochs, ...). `metric(model, batches) -> float` (default accuracy)
    is named `metric_name` (default its __name__); `step(model, batch) -> loss` replaces
    `loss(outputs, targets)` for batches that are not (inputs, targets). `shapes` sets layers'
    mode shapes by name (`tensorize`)."""
    from .train import _check_train_config, resolve_device, run_record, seed_everything
    from .trainer import Trainer

    wall_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if init not in INITS:
        raise ValueError(f"init: expected one of {', '.join(INITS)}, got {init!r}")
    strategy = get_strategy(method)
    if strategy.compresses and format not in FORMATS:
        raise ValueError(f"format: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    cfg = _check_train_config({"finetune_epochs": 0, **(train or {}), "epochs": epochs, "max_rank": max_rank, "seed": seed})
    seed_everything(seed)
    dev = resolve_device(device)
    task = BatchTask(train_data, val_data, test=test_data, device=dev, loss=loss, metric=metric,
                     metric_name=metric_name, metric_mode=metric_mode, step=step)
    net = copy.deepcopy(model).to(dev)
    targets, skipped = plan_layers(net, include=include, exclude=exclude, min_params=min_params)
    if strategy.compresses and not targets:
        reasons = "; ".join(f"{s['layer']}: {s['reason']}" for s in skipped) or "it has no Linear/Conv2d/Embedding layer"
        raise ValueError(f"model: no layer can be factorized ({reasons})")

    def tensorize_targets(target_net, fmt, rank, start):
        tensorize(target_net, format=fmt, max_rank=rank, init=start, include=targets, min_params=0, shapes=shapes)
        guard_fast_paths(target_net)
        return factorized_layers(target_net)

    dense_reference, dense_metric = None, None
    if init == "pretrained":
        dense_reference = copy.deepcopy(net).eval()
        dense_metric = task.evaluate(dense_reference)[task.primary_metric]
    trainer = Trainer(net, task, cfg, on_epoch, progress)
    run = Run(net=net, task=task, trainer=trainer, cfg=cfg, format=format, budget=budget, init=init,
              method_params=dict(method_params or {}), tensorize=tensorize_targets, dense_reference=dense_reference,
              probe=lambda: tensorize_targets(copy.deepcopy(net), format, max_rank, "random"))
    if shapes is not None and strategy.compresses:
        run.probe()  # a bad layer name or shape fails here, not after a dense phase (posthoc, lwiq start: dense)
    strategy.run(run)
    net.eval()
    record = run_record(run, strategy, task.evaluate(net), wall_start)
    record = {"model": type(model).__name__, "dataset": "custom", "init": init, "metric": task.primary_metric,
              "metric_mode": task.metric_mode, **record, "skipped": skipped, "dense_metric": dense_metric}
    return CompressResult(net, record)
