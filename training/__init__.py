"""Torch stages: the model contract and models, one trainer, one full-ranking evaluator.

Reads only the ``training/ds=...`` tables documented in ``infra.tables``.
"""
