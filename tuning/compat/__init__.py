"""Every private name of a library we use, one module per library, each use pinned by
``tests/test_compat.py`` (which fails naming the module to update when the library changes it).

Nothing is imported here: each module imports its own library, so a command that doesn't use a library
doesn't pay for importing it. Stages import these modules directly (``from tuning.compat import
transformers as hf``): a compat module is its own public surface. ``transformers.Trainer``'s private
methods are the exception: they live with the trainer in ``tuning/train/hf_private.py``.
"""
