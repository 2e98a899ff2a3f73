"""Tiny models built offline for the tests, the demo and the benchmarks (never used by a training run).

``python -m tuning.testing.tiny_model OUT_DIR`` and ``python -m tuning.testing.tiny_gpt_oss OUT_DIR``
write model folders that ``--model_name_or_path`` accepts.
"""
