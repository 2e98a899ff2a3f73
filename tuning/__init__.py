"""tuning: supervised fine-tuning of Hugging Face causal language models.

Stages, each a package: ``config`` → ``data`` → ``model`` → ``train`` (with outputs). The entry point
is :mod:`tuning.sft_trainer`.
"""

__version__ = "0.1.0"
