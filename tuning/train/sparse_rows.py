"""AdamW that updates only the embedding rows that ever had a gradient: the same result, less work.

An input embedding's gradient is zero on every row whose token is not in the batch (a 32k–256k
vocabulary, a few hundred distinct tokens a step). A dense AdamW step still reads and writes the whole
table, its gradient and both moments every step. That work changes nothing on a row whose gradient
has always been zero: its moments are exactly 0, so with ``weight_decay == 0`` the update is
``lr * 0 / (sqrt(0) + eps) = 0`` and the row stays bit-identical. Once a row has had a gradient its
moments are non-zero and it keeps moving on later steps without one, so the set of live rows only grows;
we update exactly those, with torch's own AdamW kernel (the group's foreach/fused choice) on the
gathered rows, so every updated element sees the same arithmetic as in the dense step.

Used only where this is exact: torch's ``AdamW``, a plain (not sharded) ``nn.Embedding`` weight not tied
to the output head (the head's gradient is dense), a group with ``weight_decay == 0`` (decay moves every
row), no amsgrad, no gradient scaler handing the fused kernel a scale. Anything else takes the dense step.
The optimizer state keeps torch's layout (full-size moments, one step counter), so checkpoints load into
a plain ``AdamW`` and back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.adam import adam

from tuning.compat import torch as torch_private


class SparseRowsAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose ``sparse_rows`` parameters (2-D, rows independent) skip rows that
    never had a non-zero gradient."""

    def __init__(self, params: Any, *, sparse_rows: list[torch.Tensor] = (), **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._sparse_ids = {id(p) for p in sparse_rows}
        self._live: dict[int, torch.Tensor] = {}  # id(param) → rows that ever had a gradient

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._live.clear()  # the loaded moments say which rows are live (read on the next step)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        scaled = getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None
        if closure is not None or scaled or not self._sparse_ids:
            return super().step(closure)
        held = []
        for group in self.param_groups:
            if (
                group["weight_decay"] != 0
                or group["amsgrad"]
                or group["differentiable"]
                or group["capturable"]
            ):
                continue
            for p in group["params"]:
                if id(p) in self._sparse_ids and p.grad is not None:
                    held.append((group, p, p.grad))
                    p.grad = None  # the dense step skips it: no state, no step count
        try:
            loss = super().step()
            for group, p, grad in held:
                self._row_step(group, p, grad)
        finally:
            for _, p, grad in held:
                p.grad = grad
        return loss

    def _row_step(self, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        state = self.state[p]
        if not state:  # torch's lazy initialisation (Adam._init_group), so checkpoints look the same
            fused = bool(group["fused"])
            state["step"] = (
                torch.zeros((), dtype=torch_private.optimizer_step_dtype(is_fused=fused), device=p.device)
                if fused
                else torch.tensor(0.0, dtype=torch_private.optimizer_step_dtype())
            )
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        live = self._live.get(id(p))
        if live is None:  # first step, or resumed from a checkpoint: rows with a non-zero moment
            live = _nonzero_rows(state["exp_avg"]) | _nonzero_rows(state["exp_avg_sq"])
        live |= _nonzero_rows(grad)
        self._live[id(p)] = live
        rows = live.nonzero().squeeze(1)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        sub = [t.index_select(0, rows) for t in (p, grad, exp_avg, exp_avg_sq)]
        beta1, beta2 = group["betas"]
        adam(
            [sub[0]],
            [sub[1]],
            [sub[2]],
            [sub[3]],
            [],
            [state["step"]],
            amsgrad=False,
            has_complex=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=0.0,
            eps=group["eps"],
            maximize=group["maximize"],
            foreach=group["foreach"],
            capturable=False,
            differentiable=False,
            fused=group["fused"],
            decoupled_weight_decay=True,
        )
        for full, part in zip((p, exp_avg, exp_avg_sq), (sub[0], sub[2], sub[3]), strict=True):
            full.index_copy_(0, rows, part)


def _nonzero_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows with an element that is not ±0. NaN counts (max and min propagate it).

    Two plain reductions: ~1 ms each on a 32k×256 table here, where ``vector_norm(ord=inf, dim=1)``,
    ``aminmax`` and ``any`` took 15–130 ms (benchmarks/e2e_profile.md).
    """
    return (t.amax(dim=1) != 0) | (t.amin(dim=1) != 0)


def sparse_row_candidates(model: Any) -> list[torch.Tensor]:
    """The model's input-embedding weight, when skipping its untouched rows can be exact."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if get else None
    if type(embedding) is not torch.nn.Embedding or embedding.sparse:
        return []
    weight = embedding.weight
    if not weight.requires_grad or type(weight.data) is not torch.Tensor or weight.dim() != 2:
        return []  # frozen, or a sharded tensor (FSDP2 DTensor)
    shared = sum(1 for _, p in model.named_parameters(remove_duplicate=False) if p is weight)
    return [weight] if shared == 1 else []  # tied to the head (or reused): its gradient is dense


def with_sparse_rows(optimizer_cls: Any, kwargs: dict[str, Any], model: Any) -> tuple[Any, dict[str, Any]]:
    """Swap torch's AdamW for :class:`SparseRowsAdamW` where the model has an embedding it can skip."""
    if optimizer_cls is not torch.optim.AdamW or model is None:
        return optimizer_cls, kwargs
    rows = sparse_row_candidates(model)
    return (SparseRowsAdamW, {**kwargs, "sparse_rows": rows}) if rows else (optimizer_cls, kwargs)
