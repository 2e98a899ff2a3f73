"""``--master_weights``: float32, kahan (the default of full fine-tuning in bf16) and half.

The Kahan-compensated AdamW (torch-optimi) is checked against torch's AdamW as the independent
reference: equal on float32 weights, and on bfloat16 weights it follows the float32 trajectory at lr 1e-5
where plain bfloat16 AdamW does not move. End to end, the default bf16 run learns like float32 master
weights, keeps bf16 weights and a compensation buffer, and resumes after kill -9 exactly.
"""

from __future__ import annotations

import signal

import pytest
import torch
from optimi import AdamW as KahanAdamW

from tests.conftest import io_rows, run_keeping_model, write_json
from tests.test_resume import assert_same_losses, complete_steps, fork_with_fault, losses
from tuning.config import parse_config
from tuning.config.args import TrainArgs
from tuning.errors import UserError
from tuning.model import PrecisionPlan
from tuning.sft_trainer import run
from tuning.train import read_training_logs
from tuning.train.optimizers import optimizer_cls_and_kwargs

COMMON = ["--model_name_or_path", "m", "--training_data_path", "d.json", "--output_dir", "o"]


def trajectory(optimizer_cls, dtype, steps, lr, seed=0, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Two parameter groups (one decayed) driven by the same seeded gradients; returns the final weights."""
    torch.manual_seed(seed)
    start = [torch.randn(256, 64) * 0.02, torch.ones(64)]
    params = [torch.nn.Parameter(t.to(dtype)) for t in start]
    groups = [{"params": [params[0]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}]
    optimizer = optimizer_cls(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, **kwargs)
    grads = torch.Generator().manual_seed(seed + 1)
    drift = [torch.randn(p.shape, generator=grads) for p in params]  # a direction the steps keep taking
    for _ in range(steps):
        for p, d in zip(params, drift, strict=True):
            p.grad = (d + 0.5 * torch.randn(p.shape, generator=grads)).to(dtype)
        optimizer.step()
    return tuple(p.detach().float() for p in params)


def test_kahan_adamw_is_torch_adamw_on_float32_weights():
    want = trajectory(torch.optim.AdamW, torch.float32, 20, 1e-3)
    got = trajectory(KahanAdamW, torch.float32, 20, 1e-3, kahan_sum=True)
    for w, g in zip(want, got, strict=True):
        assert torch.allclose(g, w, atol=1e-6, rtol=0), (g - w).abs().max()


def test_kahan_bf16_follows_float32_where_plain_bf16_stalls():
    start = trajectory(torch.optim.AdamW, torch.float32, 0, 1e-5)
    fp32 = trajectory(torch.optim.AdamW, torch.float32, 200, 1e-5)
    kahan = trajectory(KahanAdamW, torch.bfloat16, 200, 1e-5, kahan_sum=True)
    half = trajectory(torch.optim.AdamW, torch.bfloat16, 200, 1e-5)
    moved = (fp32[0] - start[0]).abs().mean()  # about 200 steps x 1e-5
    assert moved > 1e-3
    # plain bf16 rounds each 1e-5 step (< half a bf16 ulp of a 0.02 weight) away: the weights barely move
    assert (half[0] - start[0].bfloat16().float()).abs().mean() < 0.2 * moved
    assert (half[1] - 1).abs().max() == 0  # norm weights at 1.0: every update vanishes
    # compensated bf16 ends where float32 does, up to one bf16 rounding of the weights
    assert (kahan[0] - fp32[0]).abs().mean() < 0.05 * moved
    assert (kahan[1] - fp32[1]).abs().max() <= 2**-7  # one bf16 ulp at 1.0


def test_the_kahan_optimizer_takes_the_trainers_hyperparameters(tmp_path):
    args = TrainArgs(output_dir=str(tmp_path), learning_rate=2e-5, weight_decay=0.1, adam_beta2=0.95)
    plan = PrecisionPlan(torch.bfloat16, None, torch.bfloat16, "kahan")
    cls, kwargs = optimizer_cls_and_kwargs(args, plan)
    assert cls is KahanAdamW
    assert kwargs == {"lr": 2e-5, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "kahan_sum": True}
    for other in ("float32", "half"):  # the Trainer builds --optim itself
        assert (
            optimizer_cls_and_kwargs(args, PrecisionPlan(torch.bfloat16, None, torch.bfloat16, other)) is None
        )


def test_kahan_needs_adamw_and_bfloat16():
    with pytest.raises(UserError) as e:
        parse_config([*COMMON, "--master_weights", "kahan", "--optim", "adafactor"])
    assert str(e.value) == (
        "--master_weights kahan brings its own Kahan-compensated AdamW, but --optim is adafactor; use --optim "
        "adamw_torch, or --master_weights float32 or half to keep adafactor"
    )
    with pytest.raises(UserError, match="keeps bfloat16 weights, not --torch_dtype float16"):
        parse_config([*COMMON, "--master_weights", "kahan", "--torch_dtype", "float16"])
    assert (
        parse_config([*COMMON, "--optim", "adafactor"]).model.master_weights == "auto"
    )  # resolves to float32


# --- end to end (slow) ---


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("master-weights")
    data = write_json(root / "train.json", io_rows(2))

    def argv(out, *extra: str) -> list[str]:
        return [
            *("--model_name_or_path", str(tiny_model_dir), "--training_data_path", str(data)),
            *("--output_dir", str(out), "--use_flash_attn", "false", "--per_device_train_batch_size", "2"),
            *("--gradient_accumulation_steps", "2", "--max_steps", "6", "--learning_rate", "3e-3"),
            *("--save_strategy", "steps", "--save_steps", "2", "--logging_strategy", "steps"),
            *("--logging_steps", "1", "--seed", "7", *extra),
        ]

    return root, argv


@pytest.mark.slow
def test_default_bf16_run_keeps_bf16_weights_and_learns_like_float32_masters(job, monkeypatch):
    root, argv = job
    code, model = run_keeping_model(monkeypatch, argv(root / "kahan"))
    assert code == 0
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    state = torch.load(root / "kahan" / "checkpoint-6" / "optimizer.pt", weights_only=True)
    buffers = next(iter(state["state"].values()))
    assert {k: v.dtype for k, v in buffers.items()} == {
        "exp_avg": torch.bfloat16,
        "exp_avg_sq": torch.bfloat16,
        "kahan_comp": torch.bfloat16,
    }
    code, _ = run_keeping_model(monkeypatch, argv(root / "float32", "--master_weights", "float32"))
    assert code == 0
    kahan, fp32 = losses(root / "kahan"), losses(root / "float32")
    assert kahan[6] < 0.9 * kahan[1] and fp32[6] < 0.9 * fp32[1]
    for step in kahan:
        assert kahan[step] == pytest.approx(fp32[step], rel=0.02), (step, kahan, fp32)


@pytest.mark.slow
def test_kahan_run_resumes_after_kill_9_like_an_uninterrupted_run(job, monkeypatch):
    root, argv = job
    reference = root / "kahan-reference"
    run(parse_config(argv(reference)))
    killed = root / "kahan-killed"
    # the forked child loads the bf16 weights in its main thread: casting them in transformers' loader
    # threads can trip torch's "Invalid thread pool" assert in a child forked from a pytest process that
    # already ran torch (a fork artefact; real runs start fresh processes)
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")
    code, stderr = fork_with_fault("kill-in-step", 5, argv(killed), root / "kahan-killed.log")
    assert code == -signal.SIGKILL, stderr
    assert complete_steps(killed) == [2, 4]
    run(parse_config(argv(killed)))
    assert_same_losses(losses(killed), losses(reference))
    assert [r["step"] for r in read_training_logs(killed)] == [1, 2, 3, 4, 5, 6]
