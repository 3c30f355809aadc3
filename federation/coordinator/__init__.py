"""The coordinator: the Flower ServerApp and its round loop, aggregation strategies, secure aggregation,
participation receipts' writing, checkpoints, the pooling of evaluation releases and the model card.

Runs at the consortium's coordinator only; no site imports it (tests/test_architecture.py).
"""
