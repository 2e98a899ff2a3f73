"""SparseRowsAdamW: the same parameters and optimizer state as torch's AdamW, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from tuning.testing.tiny_model import build_model
from tuning.train.sparse_rows import SparseRowsAdamW, sparse_row_candidates, with_sparse_rows

VOCAB = 300


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    """Token batches whose vocabulary widens step by step: some rows get a gradient once, early, and
    must keep moving afterwards (non-zero moments); rows past 200 never get one."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randint(0, 40 + 12 * i, (2, 9), generator=g) for i in range(n)]
    out[1] = torch.tensor([[150, 151, 152, 3, 4, 5, 6, 7, 8]] * 2)  # rows 150-152: only at step 1
    return out


def train(model, optimizer, steps: list[torch.Tensor]) -> None:
    for ids in steps:
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()


def pair(**adam_kwargs):
    dense = build_model(VOCAB, hidden_size=40)  # 40: rows not a multiple of the vector width
    sparse = copy.deepcopy(dense)
    kwargs = {"lr": 1e-2, "weight_decay": 0.0, **adam_kwargs}
    return (
        (dense, torch.optim.AdamW(dense.parameters(), **kwargs)),
        (sparse, SparseRowsAdamW(sparse.parameters(), sparse_rows=sparse_row_candidates(sparse), **kwargs)),
    )


def assert_same(a, b) -> None:
    (ma, oa), (mb, ob) = a, b
    for (name, pa), pb in zip(ma.named_parameters(), mb.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        sa, sb = oa.state[pa], ob.state[pb]
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and sa[key].device == sb[key].device, (name, key)
            assert torch.equal(sa[key], sb[key]), (name, key)


@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_bit_identical_to_torch_adamw(impl):
    dense, sparse = pair(**impl)
    before = sparse[0].get_input_embeddings().weight.detach().clone()
    train(*dense, batches(8))
    train(*sparse, batches(8))
    assert_same(dense, sparse)
    weight = sparse[0].get_input_embeddings().weight
    live = sparse[1]._live[id(weight)]
    # the optimisation did happen: rows never seen were skipped (and are untouched), seen rows moved
    assert live[150:153].all() and not live[200:].any()
    assert torch.equal(weight[200:], before[200:])
    assert not torch.equal(weight[150], before[150])


def test_rows_seen_once_keep_moving_without_a_gradient():
    _, (model, opt) = pair(fused=True)
    train(model, opt, batches(2))
    weight = model.get_input_embeddings().weight
    row = weight[151].detach().clone()
    train(model, opt, [torch.tensor([[3, 4, 5, 6]])])  # row 151 gets no gradient here
    assert not torch.equal(weight[151], row)


def test_weight_decay_takes_the_dense_step():
    dense, sparse = pair(fused=True, weight_decay=0.1)
    train(*dense, batches(4))
    train(*sparse, batches(4))
    assert_same(dense, sparse)
    assert not sparse[1]._live  # decay moves every row: nothing skipped


def test_checkpoint_state_moves_between_the_two_optimizers():
    """A checkpoint of either optimizer resumes into the other with identical results (same state layout)."""
    dense, sparse = pair(fused=True)
    steps = batches(8)
    train(*dense, steps[:4])
    train(*sparse, steps[:4])
    dense[1].load_state_dict(copy.deepcopy(sparse[1].state_dict()))
    resumed_model = copy.deepcopy(dense[0])
    resumed = SparseRowsAdamW(
        resumed_model.parameters(),
        sparse_rows=sparse_row_candidates(resumed_model),
        lr=1e-2,
        weight_decay=0.0,
    )
    train(resumed_model, resumed, steps[:1])  # its own live rows (about to be replaced)
    resumed_model.load_state_dict(dense[0].state_dict())
    resumed.load_state_dict(copy.deepcopy(dense[1].state_dict()))  # live rows come from the moments
    train(*dense, steps[4:])
    train(resumed_model, resumed, steps[4:])
    assert_same(dense, (resumed_model, resumed))


def test_only_where_exact():
    untied = build_model(VOCAB)
    assert sparse_row_candidates(untied) == [untied.get_input_embeddings().weight]
    assert sparse_row_candidates(build_model(VOCAB, tie_word_embeddings=True)) == []  # head gradient is dense
    frozen = build_model(VOCAB)
    frozen.get_input_embeddings().weight.requires_grad_(False)
    assert sparse_row_candidates(frozen) == []
    assert with_sparse_rows(torch.optim.SGD, {"lr": 1}, untied) == (torch.optim.SGD, {"lr": 1})
    cls, kwargs = with_sparse_rows(torch.optim.AdamW, {"lr": 1}, untied)
    assert cls is SparseRowsAdamW and kwargs["sparse_rows"] == [untied.get_input_embeddings().weight]


def test_the_trainer_builds_it_by_default(tokenizer, tmp_path):
    """Our default ``--optim adamw_torch_fused`` on an untied model: SparseRowsAdamW, fused kernel."""
    import datasets

    from tuning.config.args import TrainArgs
    from tuning.data import DataStats, PreparedData
    from tuning.model.loading import PrecisionPlan
    from tuning.train.trainer import build_trainer

    rows = [{"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]}] * 2
    data = PreparedData(datasets.Dataset.from_list(rows), None, "pretokenized", DataStats())
    model = build_model(len(tokenizer))
    plan = PrecisionPlan(torch.float32, None, torch.float32)
    args = TrainArgs(output_dir=str(tmp_path), save_strategy="no", report_to="none", use_cpu=True)
    optimizer = build_trainer(args, model, tokenizer, data, plan).create_optimizer()
    assert type(optimizer) is SparseRowsAdamW and all(g["fused"] for g in optimizer.param_groups)
    assert optimizer._sparse_ids == {id(model.get_input_embeddings().weight)}
    args = TrainArgs(
        output_dir=str(tmp_path), optim="sgd", save_strategy="no", report_to="none", use_cpu=True
    )
    sgd = build_trainer(args, build_model(len(tokenizer)), tokenizer, data, plan).create_optimizer()
    assert type(sgd) is torch.optim.SGD
