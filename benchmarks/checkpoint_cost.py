"""What one checkpoint costs per rank, for each checkpoint type, on 2 CPU processes (gloo).

For each type a 2-process job (tiny Llama by default, ``--hidden``/``--layers`` for a bigger one)
trains 8 steps with a checkpoint every 2, and every rank times each of its ``_save_checkpoint`` calls
(HF's writer plus our fsync and commit marker; barriers included, so the ranks' times agree). Bytes are
attributed to the rank that writes them: ``__{rank}_*.distcp`` (torch.distributed.checkpoint shards),
``rng_state_{rank}.pth``, ``zero_pp_rank_{rank}_*`` (DeepSpeed) to that rank, everything else to rank 0
(the only other writer). Types: FSDP ``FULL_STATE_DICT``, FSDP ``SHARDED_STATE_DICT``, and, where
DeepSpeed is installed, ZeRO-3 shards and ZeRO-3 with a 16-bit gather at every checkpoint.

    python benchmarks/checkpoint_cost.py                        # tiny model, prints a table, writes JSON
    python benchmarks/checkpoint_cost.py --hidden 512 --layers 8  # ~40M parameters: where the gap shows

Run it on a quiet machine: the seconds are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TYPES = {
    "fsdp FULL_STATE_DICT": ["--config_file", "fixtures/accelerate_fsdp_defaults.yaml"],
    "fsdp SHARDED_STATE_DICT": [
        *("--config_file", "fixtures/accelerate_fsdp_defaults.yaml"),
        *("--fsdp_state_dict_type", "SHARDED_STATE_DICT"),
    ],
    "deepspeed ZeRO-3 shards": ["--config_file", "fixtures/accelerate_deepspeed_zero3.yaml"],
    "deepspeed ZeRO-3 + 16-bit gather": [
        *("--config_file", "fixtures/accelerate_deepspeed_zero3.yaml"),
        *("--zero3_save_16bit_model", "true"),
    ],
}
_RANKED = re.compile(r"^__(\d+)_\d+\.distcp$|^rng_state_(\d+)\.pth$|^zero_pp_rank_(\d+)_")


def worker(record: str, argv: list[str]) -> int:
    """One rank: time every checkpoint save, then run the real entry point."""
    from tuning.sft_trainer import main
    from tuning.train.distributed import exit_process
    from tuning.train.trainer import SFTTrainer

    original = SFTTrainer._save_checkpoint

    def timed(self, model, trial):
        start = time.perf_counter()
        original(self, model, trial)
        line = {"rank": self.args.process_index, "step": self.state.global_step}
        line["seconds"] = time.perf_counter() - start
        with open(record, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    SFTTrainer._save_checkpoint = timed
    exit_process(main(argv))
    return 0


def bytes_per_rank(checkpoint: Path, ranks: int) -> list[int]:
    written = [0] * ranks
    for file in checkpoint.rglob("*"):
        if file.is_file():
            match = _RANKED.match(file.name)
            rank = int(next(g for g in match.groups() if g is not None)) if match else 0
            written[rank] += file.stat().st_size
    return written


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_type(name: str, launch: list[str], model: Path, data: Path, root: Path) -> dict:
    out, record = root / name.replace(" ", "_"), root / f"{name.replace(' ', '_')}.jsonl"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_processes", "2"]
    cmd += ["--main_process_port", str(free_port()), __file__, "--worker", str(record)]
    cmd += ["--model_name_or_path", str(model), "--training_data_path", str(data), "--output_dir", str(out)]
    cmd += ["--dataset_text_field", "output", "--torch_dtype", "float32", "--max_steps", "8"]
    cmd += ["--per_device_train_batch_size", "2", "--save_steps", "2", "--logging_steps", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    saves = [json.loads(line) for line in record.read_text().splitlines()]
    per_rank = [[s["seconds"] for s in saves if s["rank"] == r] for r in (0, 1)]
    written = [bytes_per_rank(p, 2) for p in sorted(out.glob("checkpoint-*"))]
    return {
        "type": name,
        "checkpoints": len(written),
        "seconds_per_rank": [statistics.median(s) for s in per_rank],
        "bytes_per_rank": [statistics.median(w[r] for w in written) for r in (0, 1)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "checkpoint_cost.json"))
    args = parser.parse_args()
    import importlib.util

    from safetensors.torch import load_file

    from tests.conftest import text_rows, write_json
    from tuning.testing.tiny_model import write_tiny_model

    root = Path(tempfile.mkdtemp(prefix="checkpoint-cost-"))
    shape = {
        "hidden_size": args.hidden,
        "intermediate_size": 2 * args.hidden,
        "num_hidden_layers": args.layers,
    }
    model = write_tiny_model(root / "model", **shape)
    data = write_json(root / "data.json", text_rows())
    types = {k: v for k, v in TYPES.items() if "deepspeed" not in k or importlib.util.find_spec("deepspeed")}
    results = [run_type(name, launch, model, data, root) for name, launch in types.items()]
    params = sum(v.numel() for v in load_file(model / "model.safetensors").values())
    print(
        f"{params:,} parameters ({params * 4 / 2**20:.1f} MiB in float32), 2 processes, median of checkpoints"
    )
    print("| checkpoint type | seconds rank 0 | seconds rank 1 | bytes rank 0 | bytes rank 1 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        s, b = r["seconds_per_rank"], r["bytes_per_rank"]
        print(f"| {r['type']} | {s[0]:.3f} | {s[1]:.3f} | {b[0]:,.0f} | {b[1]:,.0f} |")
    Path(args.out).write_text(
        json.dumps({"parameters": params, "results": results}, indent=1), encoding="utf-8"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(worker(sys.argv[2], sys.argv[3:]))
    main()
