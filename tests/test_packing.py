"""Packing: ``bfd`` (whole samples, best-fit decreasing, ``position_ids`` restarting per sample) trains exactly
what unpacked batches of the same samples train; ``wrapped`` (pretraining-style) lets samples attend to
each other."""

from __future__ import annotations

import logging
import random

import datasets
import pytest
import torch

from tests.conftest import loss_and_grads, write_jsonl
from tuning.config import parse_config
from tuning.data.batching import best_fit_decreasing, pack, pack_best_fit
from tuning.data.collate import PaddingCollator, PaddingFreeCollator
from tuning.errors import UserError
from tuning.testing.tiny_model import build_model
from tuning.train.callbacks import read_training_logs
from tuning.train.speed import choose_collator

X = -100
BASE = ["--model_name_or_path", "m", "--training_data_path", "d", "--output_dir", "o"]


def test_best_fit_decreasing_fills_the_tightest_bin_longest_first():
    # longest first: 12 11 10 9 open four bins; 7 fits exactly the 9's room, 6 the 10's, 5 the 11's, 4 the 12's
    assert best_fit_decreasing([12, 4, 11, 5, 10, 6, 9, 7], 16) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # 8 opens a bin (5 left), 6 doesn't fit it (a new bin, 7 left), 5 fills the first exactly, 2 joins the 6
    assert best_fit_decreasing([8, 6, 5, 2], 13) == [[0, 2], [1, 3]]
    assert best_fit_decreasing([3, 0, 3], 4) == [[0], [2]]  # an empty sample goes nowhere


def test_best_fit_decreasing_keeps_every_sample_and_the_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(400)]
    bins = best_fit_decreasing(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(400))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert sum(lengths) / (64 * len(bins)) > 0.95  # rows nearly full


def test_packed_rows_restart_positions_and_untrain_each_first_token():
    ds = datasets.Dataset.from_dict(
        {"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]], "labels": [[X, 2, 3], [4, 5], [X, 7, 8, 9]]}
    )
    packed = pack_best_fit(ds, 5)
    assert packed["input_ids"] == [[6, 7, 8, 9], [1, 2, 3, 4, 5]]
    assert packed["position_ids"] == [[0, 1, 2, 3], [0, 1, 2, 0, 1]]
    # sample [4, 5]'s first label becomes -100: the token before it (3) belongs to another sample
    assert packed["labels"] == [[X, 7, 8, 9], [X, 2, 3, X, 5]]
    assert pack(ds, 5, "wrapped")["input_ids"] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    with pytest.raises(ValueError, match="longer than the packing row"):
        pack_best_fit(ds, 3)


def test_collator_keeps_the_positions_of_packed_rows():
    rows = [
        {"input_ids": [1, 5, 6, 1, 7], "labels": [X, 5, 6, X, 7], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [1, 8, 9], "labels": [X, 8, 9], "position_ids": [0, 1, 2]},
    ]
    batch = PaddingFreeCollator()(rows)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 7, 1, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[X, 5, 6, X, 7, X, 8, 9]]


SAMPLES = [  # (input_ids, labels): prompt tokens untrained, as the data stage writes them
    ([1, 5, 6, 7, 8, 9], [X, X, X, 7, 8, 9]),
    ([1, 10, 11, 12], [X, X, 11, 12]),
    ([1, 13, 14, 15, 16, 17, 18, 19], [X, X, X, X, X, 17, 18, 19]),
    ([1, 20, 21], [X, 20, 21]),
]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bfd_rows_equal_unpacked_samples_and_wrapped_rows_do_not(tokenizer, attn):
    ds = datasets.Dataset.from_dict({"input_ids": [s[0] for s in SAMPLES], "labels": [s[1] for s in SAMPLES]})
    model = build_model(len(tokenizer), attn_implementation=attn)
    model.config.use_cache = False  # what the model stage sets
    samples = [{"input_ids": i, "labels": lab} for i, lab in SAMPLES]
    padded_loss, padded_grads = loss_and_grads(model, PaddingCollator(pad_id=2)(samples))
    packed = pack_best_fit(ds, 10)
    assert [len(r) for r in packed["input_ids"]] == [8, 6 + 4, 3]  # one row holds two samples
    bfd_loss, bfd_grads = loss_and_grads(model, PaddingFreeCollator()(list(packed)))
    assert torch.allclose(bfd_loss, padded_loss, atol=1e-5, rtol=0)
    assert torch.allclose(bfd_grads, padded_grads, atol=1e-5, rtol=0)
    # the same tokens, one row per packed row, positions counting on across samples: they attend to each other
    wrapped = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in packed]
    leaky_loss = model(**PaddingCollator(pad_id=2)(wrapped)).loss
    assert abs(leaky_loss.item() - padded_loss.item()) > 1e-3


def test_bfd_needs_padding_free_batches(tokenizer):
    with pytest.raises(UserError, match="--padding_free is false"):
        parse_config([*BASE, "--packing", "--padding_free", "false"])
    assert parse_config([*BASE, "--packing", "--padding_free", "false", "--packing_strategy", "wrapped"])
    with pytest.raises(UserError, match="invalid|choice"):
        parse_config([*BASE, "--packing", "--packing_strategy", "ffd"])
    model = build_model(len(tokenizer))
    model.config.use_cache = True  # a blocker: padding-free would not be exact, so neither would bfd rows
    with pytest.raises(UserError, match="packing_strategy bfd .* not exact here: model.config.use_cache"):
        choose_collator(True, model, tokenizer, packed=True)
    model.config.use_cache = False
    assert isinstance(choose_collator(False, model, tokenizer, packed=True), PaddingFreeCollator)


def _train(tmp_path, name, rows, *flags):
    from tuning import sft_trainer

    out = tmp_path / name
    argv = [
        *("--model_name_or_path", str(tmp_path / "model"), "--output_dir", str(out)),
        *("--training_data_path", str(rows), "--torch_dtype", "float32", "--use_flash_attn", "false"),
        *("--max_seq_length", "16", "--max_steps", "8", "--logging_steps", "1", "--save_strategy", "no"),
        *("--learning_rate", "1e-2", "--train_sampling_strategy", "sequential", "--seed", "3"),
        *flags,
    ]
    assert sft_trainer.main(argv) == 0
    return [r["value"] for r in read_training_logs(out)]


@pytest.mark.slow
def test_packed_run_trains_exactly_like_the_unpacked_run(tmp_path, caplog):
    """Same samples per step, same order: a bfd-packed run (one packed row per step) and an unpacked, padded
    run (the same two samples per step) log the same loss at every step, 8 steps over 2 epochs, so the
    weights stay equal too. Wrapped packing cuts the very same rows but lets the samples see each other."""
    from tuning.testing.tiny_model import write_tiny_model

    write_tiny_model(tmp_path / "model")
    rng = random.Random(0)
    rows = []
    for n in (12, 4, 11, 5, 10, 6, 9, 7):  # bfd packs them back into these pairs: [12 4] [11 5] [10 6] [9 7]
        ids = [1, *(rng.randint(5, 60) for _ in range(n - 1))]
        prompt = n // 2
        rows.append({"input_ids": ids, "labels": [X] * prompt + ids[prompt:]})
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    unpacked = _train(
        tmp_path, "unpacked", data, "--per_device_train_batch_size", "2", "--padding_free", "false"
    )
    with caplog.at_level(logging.INFO, logger="tuning"):
        packed = _train(tmp_path, "packed", data, "--per_device_train_batch_size", "1", "--packing")
    assert "packing (bfd): 8 samples into 4 rows of up to 16 tokens (100% full)" in caplog.messages
    wrapped = _train(
        tmp_path, "wrapped", data, "--per_device_train_batch_size", "1", "--packing",
        "--packing_strategy", "wrapped", "--padding_free", "false",
    )  # fmt: skip
    assert len(unpacked) == len(packed) == 8
    assert max(abs(a - b) for a, b in zip(unpacked, packed, strict=True)) < 1e-5, (unpacked, packed)
    assert abs(wrapped[0] - unpacked[0]) > 1e-3  # cross-sample attention changes the very first step
