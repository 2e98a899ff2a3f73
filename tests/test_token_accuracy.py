"""mean_token_accuracy: equal to a reference from full logits, padded or padding-free, label-only or standard
loss, any split of the step into micro-batches (the loss's normalisation: all hits / all trained tokens)."""

from __future__ import annotations

import datasets
import pytest
import torch

from tuning.config.args import TrainArgs
from tuning.data import DataStats, PreparedData
from tuning.data.collate import PaddingCollator, PaddingFreeCollator
from tuning.model.loading import PrecisionPlan
from tuning.testing.tiny_model import build_model
from tuning.train.loss import label_only_loss, token_accuracy_counts
from tuning.train.trainer import build_trainer

X = -100


def _rows(model: torch.nn.Module) -> list[dict]:
    """Samples whose answers are partly the model's own greedy continuation (hits) and partly not, so the
    accuracy is neither 0 nor 1; each trains a different number of tokens."""
    rows = []
    for i, (prompt_len, greedy, other) in enumerate([(3, 2, 1), (5, 4, 3), (2, 1, 0), (4, 0, 2), (6, 3, 3)]):
        ids = [1, *range(10 + i, 10 + i + prompt_len - 1)]
        with torch.no_grad():
            for _ in range(greedy):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        ids += [(7 * k + 3 * i) % 60 + 5 for k in range(other)]
        rows.append({"input_ids": ids, "labels": [X] * prompt_len + ids[prompt_len:]})
    return rows * 2  # 10 samples


def _reference(model: torch.nn.Module, rows: list[dict]) -> tuple[int, int]:
    """Hits and trained tokens, one unpadded sample at a time, from the model's full logits."""
    hits = tokens = 0
    with torch.no_grad():
        for row in rows:
            predicted = model(torch.tensor([row["input_ids"]])).logits[0].argmax(-1).tolist()
            for position, label in enumerate(row["labels"][1:]):
                if label != X:
                    tokens += 1
                    hits += int(predicted[position] == label)
    return hits, tokens


@pytest.fixture(scope="module")
def model(tokenizer):
    model = build_model(len(tokenizer))
    model.config.use_cache = False
    return model


@pytest.mark.parametrize("padding_free", [False, True])
def test_chunks_and_full_logits_count_the_reference_hits(model, padding_free):
    rows = _rows(model)
    hits, tokens = _reference(model, rows)
    assert 0 < hits < tokens  # the samples really mix hits and misses
    batch = (PaddingFreeCollator() if padding_free else PaddingCollator(pad_id=2))(rows)
    for chunk_tokens in (1, 4, 2048):
        found: list[torch.Tensor] = []
        with torch.no_grad():
            label_only_loss(model, batch, chunk_tokens=chunk_tokens, correct=found)
        assert sum(int(h) for h in found) == hits
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert [int(v) for v in token_accuracy_counts(logits, batch["labels"])] == [hits, tokens]


def _logged_accuracy(tokenizer, tmp_path, rows, batch_size, accumulation, loss_implementation, padding_free):
    train = datasets.Dataset.from_list(rows)
    data = PreparedData(train, datasets.Dataset.from_list(rows), "pretokenized", DataStats())
    args = TrainArgs(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=3,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=0.0,
        optim="sgd",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        report_to="none",
        use_cpu=True,
        loss_implementation=loss_implementation,
        padding_free=padding_free,
        dataloader_drop_last=False,
    )
    model = build_model(len(tokenizer))
    model.config.use_cache = False
    trainer = build_trainer(args, model, tokenizer, data, PrecisionPlan(torch.float32, None, torch.float32))
    trainer.train()
    train_log = next(h for h in trainer.state.log_history if "loss" in h)
    eval_log = next(h for h in trainer.state.log_history if "eval_loss" in h)
    return train_log, eval_log


@pytest.mark.parametrize(("loss_implementation", "padding_free"), [("label_only", True), ("standard", False)])
def test_logged_accuracy_is_exact_under_accumulation(
    tokenizer, model, tmp_path, loss_implementation, padding_free
):
    rows = _rows(model)
    hits, tokens = _reference(model, rows)
    for batch, accumulation in [(10, 1), (1, 10), (3, 4)]:  # 3 x 4: the last micro-batch holds one sample
        train, evaluation = _logged_accuracy(
            tokenizer,
            tmp_path / f"{batch}x{accumulation}",
            rows,
            batch,
            accumulation,
            loss_implementation,
            padding_free,
        )
        assert train["window_trained_tokens"] == tokens and train["mean_token_accuracy"] == hits / tokens
        assert evaluation["eval_window_trained_tokens"] == tokens
        assert evaluation["eval_mean_token_accuracy"] == hits / tokens
