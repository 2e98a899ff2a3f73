"""Memory of the data audit's read of a large processed table: 1,000,000 samples of 64 tokens (a 1 GB
table, memory-mapped from disk as ``datasets``' cache is), counted by ``tuning.data.prepare.count``.

    python benchmarks/audit_memory.py [--samples 1000000] [--work /tmp/audit_memory]

Prints the process's anonymous memory (RssAnon, sampled every 10 ms) before and at its peak during the
count: the audit keeps about 12 bytes per sample and works batch by batch, so the peak grows with the
sample count, not with the tokens. Not run by the tests.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from tuning.data.prepare import count

BLOCK = 20_000


def anonymous_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024
    return 0.0


def make(path: Path, samples: int) -> None:
    rng = np.random.default_rng(0)
    ids = [list(range(i % 50, i % 50 + 64)) for i in range(BLOCK)]
    labels = [[-100] * 32 + list(range(i % 50, i % 50 + 32)) for i in range(BLOCK)]
    block = pa.table(
        {
            "input_ids": ids,
            "labels": labels,
            "status": ["ok"] * (BLOCK - 10) + ["no_trained_token"] * 10,
            "truncated": [False] * BLOCK,
            "trained_lost": rng.integers(0, 2, BLOCK),
        }
    )
    datasets.Dataset(pa.concat_tables([block] * (samples // BLOCK))).save_to_disk(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--work", default="/tmp/audit_memory")
    opts = parser.parse_args()
    path = Path(opts.work)
    if not path.exists():
        make(path, opts.samples)
    ds = datasets.load_from_disk(str(path))
    base = anonymous_mib()
    peak, done = [base], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anonymous_mib())
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()
    start = time.perf_counter()
    stats = count(ds)
    seconds = time.perf_counter() - start
    done.set()
    print(
        f"{stats.samples} samples, {stats.total_tokens} tokens counted in {seconds:.1f}s; anonymous memory "
        f"{base:.0f} MiB before, {peak[0]:.0f} MiB at the peak (+{peak[0] - base:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
