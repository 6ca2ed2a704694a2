"""Sparse table optimizers applied inside backward, to the table slices a batch touched.

A dense optimizer over embedding tables costs in proportion to the tables (a DLRM at the Criteo
Kaggle cardinalities with dense Adam needs ~70 GB at dim 128); TorchRec / FBGEMM instead update
the looked-up rows during backward with a row-wise rule, so a step costs in proportion to the
batch. This module does the same for our tables:

- fused TT/TTM lookups (`tt_lookup.py`) hand each touched core slice's summed gradient to the
  optimizer and give autograd no core gradient (a TT table's column cores too, from the tail's
  backward: every one of their slices is touched). The optimizer applies them when the backward
  pass ends: every gradient of the pass is then taken at the values the forward used (the
  lookups read the cores in place), and a table looked up twice in one graph gets one update
  from its summed gradient, as a dense optimizer would;
- every other table parameter (cp / tucker factors, gated or masked cores, plain
  `nn.EmbeddingBag` weights, sparse gradients included) gets a post-accumulate-grad hook that
  applies the same rule to the slices with a gradient and clears `.grad`.

A *slice* ("row") is one index of a parameter's first table-mode dimension: a row of a plain
table, a digit of a TT/TTM core (dim 1), a row of a CP/Tucker factor matrix; a Tucker core is
one slice. The dense optimizer (Adam/SGD) sees these parameters with `.grad = None` and skips them.

Rules (`TABLE_OPTIMIZERS`): `sgd`; `rowwise_adagrad` (FBGEMM's EXACT_ROWWISE_ADAGRAD: one
accumulator per slice, += mean of the squared gradient); `adam` (lazy, as torch.optim.SparseAdam:
moments of touched slices only, one step count per parameter).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

TABLE_OPTIMIZERS: dict[str, type["TableOptimizer"]] = {}
# the running backward pass (-1: none); a torch without it applies fused updates at once
_backward_pass = getattr(torch._C, "_current_graph_task_id", lambda: -1)


class TableOptimizer:
    """One update rule; `update(param, dim, index, grad)` with grad shaped like param.index_select(dim, index)."""

    def __init_subclass__(cls, name: str, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.name = name
        TABLE_OPTIMIZERS[name] = cls

    def __init__(self, lr: float, eps: float = 1e-8):
        if not lr > 0:
            raise ValueError(f"table_lr: expected a positive learning rate, got {lr!r}")
        self.lr, self.eps = float(lr), float(eps)
        self.state: dict[int, dict] = {}
        self._hooks: list = []
        self._layers: list = []
        self._sparse: list = []
        self._pending: list = []  # fused core updates of the running backward pass
        self._pending_pass: int | None = None

    def _state(self, param: torch.Tensor) -> dict:
        return self.state.setdefault(param.data_ptr(), {})  # data_ptr: a view of the whole tensor shares it

    def update(self, param: torch.Tensor, dim: int, index: torch.Tensor, grad: torch.Tensor) -> None:
        """Apply the rule to `param`'s slices `index` (distinct) along `dim`, in place. Callers hold
        torch.no_grad() (a decorator here cost ~4 us per call: six calls per table and step)."""
        raise NotImplementedError

    # ---- wiring ---------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> "TableOptimizer":
        """Take over every table parameter of `model` (see the module docstring)."""
        from .layers import FactorizedEmbeddingBag

        for module in model.modules():
            if isinstance(module, FactorizedEmbeddingBag):
                module.table_update = self._core_update
                self._layers.append(module)
                for factor, labels in zip(module.weight.factors, module.weight.labels):
                    dims = [d for d, lb in enumerate(labels) if lb[0] == "mode"]
                    self._hook(factor, dims[0] if dims and len(dims) < len(labels) else None)
            elif isinstance(module, (nn.EmbeddingBag, nn.Embedding)):
                self._sparse.append((module, module.sparse))
                module.sparse = True  # a gradient of the looked-up rows only, never a dense table-sized one
                self._hook(module.weight, 0)
        return self

    def detach(self) -> None:
        """Remove the hooks: the model trains with ordinary optimizers again."""
        for h in self._hooks:
            h.remove()
        for layer in self._layers:
            layer.table_update = None
        for module, sparse in self._sparse:
            module.sparse = sparse
        self._hooks, self._layers, self._sparse = [], [], []

    def _core_update(self, core: torch.Tensor, index: torch.Tensor, grad: torch.Tensor) -> None:
        """A fused lookup's update of a TT/TTM core's slices `index` (dim 1: the core's digit),
        applied when the running backward pass ends (see the module docstring)."""
        current = _backward_pass()
        if current < 0:  # not called from a backward pass: nothing to wait for
            with torch.no_grad():
                self.update(core, 1, index, grad)
            return
        if self._pending_pass != current:  # a pass that raised never ran its callback: its updates go
            self._pending, self._pending_pass = [], current
            torch.autograd.Variable._execution_engine.queue_callback(self._apply_pending)
        self._pending.append((core, index, grad))

    def _apply_pending(self) -> None:
        pending, self._pending, self._pending_pass = self._pending, [], None
        by_core: dict[int, tuple] = {}
        for core, index, grad in pending:
            by_core.setdefault(core.data_ptr(), (core, []))[1].append((index, grad))
        with torch.no_grad():
            for core, parts in by_core.values():
                index, grad = parts[0] if len(parts) == 1 else _summed(parts)
                self.update(core, 1, index, grad)

    def _hook(self, param: nn.Parameter, dim: int | None) -> None:
        if param.requires_grad:
            self._hooks.append(param.register_post_accumulate_grad_hook(partial(self._apply_grad, dim=dim)))

    @torch.no_grad()
    def _apply_grad(self, param: torch.Tensor, dim: int | None) -> None:
        grad = param.grad
        param.grad = None
        if grad is None:
            return
        if grad.is_sparse:  # nn.EmbeddingBag(sparse=True): rows along dim 0
            grad = grad.coalesce()
            self.update(param, 0, grad.indices()[0], grad.values())
            return
        if dim is None:  # one slice: the whole tensor
            self.update(param.data.unsqueeze(0), 0, torch.zeros(1, dtype=torch.long, device=grad.device), grad.unsqueeze(0))
            return
        other = [d for d in range(grad.dim()) if d != dim]
        touched = torch.nonzero(grad.abs().amax(dim=other) if other else grad.abs()).flatten()
        if touched.numel():
            self.update(param, dim, touched, grad.index_select(dim, touched))


def _summed(parts: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """One (distinct index, gradient) pair from several along dim 1, repeated slices summed."""
    index, inverse = torch.unique(torch.cat([i for i, _ in parts]), return_inverse=True)
    grads = torch.cat([g for _, g in parts], dim=1)
    return index, grads.new_zeros(grads.shape[0], len(index), *grads.shape[2:]).index_add_(1, inverse, grads)


def _rows(t: torch.Tensor, dim: int, shape: torch.Size) -> torch.Tensor:
    """Per-slice values (len,) broadcast like a slice tensor of `shape` along `dim`."""
    view = [1] * len(shape)
    view[dim] = -1
    return t.view(view)


class SGD(TableOptimizer, name="sgd"):
    def update(self, param, dim, index, grad):
        param.data.index_add_(dim, index, grad, alpha=-self.lr)


class RowwiseAdagrad(TableOptimizer, name="rowwise_adagrad"):
    def update(self, param, dim, index, grad):
        state = self._state(param)
        if "sum" not in state:
            wide = torch.promote_types(param.dtype, torch.float32)  # fp32 accumulators for half tables, as FBGEMM
            state["sum"] = torch.zeros(param.shape[dim], dtype=wide, device=param.device)
        other = [d for d in range(grad.dim()) if d != dim]
        g2 = grad.to(state["sum"].dtype).pow(2)
        g2 = g2.mean(dim=other) if other else g2
        acc = state["sum"].index_add_(0, index, g2).index_select(0, index)
        step = grad / _rows(acc.sqrt().add_(self.eps), dim, grad.shape).to(grad.dtype)
        param.data.index_add_(dim, index, step, alpha=-self.lr)


class Adam(TableOptimizer, name="adam"):
    def __init__(self, lr: float, eps: float = 1e-8, betas=(0.9, 0.999)):
        super().__init__(lr, eps)
        self.betas = betas

    def update(self, param, dim, index, grad):
        state = self._state(param)
        if "m" not in state:
            state.update(m=torch.zeros_like(param.data), v=torch.zeros_like(param.data), step=0)
        b1, b2 = self.betas
        state["step"] += 1
        t = state["step"]
        m = state["m"].index_select(dim, index).mul_(b1).add_(grad, alpha=1 - b1)
        v = state["v"].index_select(dim, index).mul_(b2).addcmul_(grad, grad, value=1 - b2)
        state["m"].index_copy_(dim, index, m)
        state["v"].index_copy_(dim, index, v)
        # torch.optim.SparseAdam's arithmetic, so that it is the reference
        step_size = self.lr * (1 - b2**t) ** 0.5 / (1 - b1**t)
        param.data.index_add_(dim, index, m / v.sqrt_().add_(self.eps), alpha=-step_size)


def make_table_optimizer(name: str, lr: float) -> TableOptimizer:
    if name not in TABLE_OPTIMIZERS:
        raise ValueError(f"table_optimizer: unknown {name!r}; expected one of {', '.join(TABLE_OPTIMIZERS)}")
    return TABLE_OPTIMIZERS[name](lr)
