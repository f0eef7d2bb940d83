"""One unlearning run: the pipeline (``pipeline.py``), its checks, adapters, ``Trainer`` and outputs.

Importing this package loads none of its modules."""
