"""In-process A/B of token accuracy's cost: 100 steps of the tiny Llama, logging every step, the label-only
loss with and without counting argmax hits (alternating, 5 runs each). Run from the repo root:
``PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/accuracy_ab.py``."""

import json
import statistics
import sys
import tempfile
import time

sys.path.insert(0, ".")
import datasets
import torch

import tuning.train.trainer as T
from tuning.config.args import TrainArgs
from tuning.data import DataStats, PreparedData
from tuning.model.loading import PrecisionPlan
from tuning.testing.tiny_model import build_model, build_tokenizer

torch.set_num_threads(1)
tok = build_tokenizer()
rows = [
    {"input_ids": [1, *range(5, 5 + n)], "labels": [-100] * (n // 2 + 1) + list(range(5 + n // 2, 5 + n))}
    for n in [20, 35, 50, 12, 60, 44, 28, 33] * 50
]
orig_loss, orig_metrics = T.label_only_loss, T.SFTTrainer._accuracy_metrics


def once(on):
    T.label_only_loss = orig_loss if on else (lambda m, i, n=None, correct=None: orig_loss(m, i, n))
    T.SFTTrainer._accuracy_metrics = orig_metrics if on else (lambda self, mode, prefix: {})
    data = PreparedData(datasets.Dataset.from_list(rows), None, "pretokenized", DataStats())
    args = TrainArgs(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=4,
        max_steps=100,
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    model = build_model(len(tok))
    model.config.use_cache = False
    tr = T.build_trainer(args, model, tok, data, PrecisionPlan(torch.float32, None, torch.float32))
    s = time.perf_counter()
    tr.train()
    return time.perf_counter() - s


res = {True: [], False: []}
for _ in range(5):
    for on in (False, True):
        res[on].append(once(on))
print(json.dumps({("with accuracy" if k else "without"): [round(x, 3) for x in v] for k, v in res.items()}))
print("median with/without:", statistics.median(res[True]) / statistics.median(res[False]))
