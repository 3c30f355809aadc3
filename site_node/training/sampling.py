"""Mini-batch index streams: Poisson sampling for DP-SGD, shuffled fixed-size batches for plain training.

DP-SGD's accountant assumes Poisson sampling: every patient joins each step's batch independently with
probability q, and nobody learns who did. Opacus draws that as `torch.rand(n) < q` per step, which costs
O(n) random numbers per step; for the small tabular models trained here that alone is a large share of a
step. We draw the same distribution in O(q n): the batch size K ~ Binomial(n, q), then a uniformly random
subset of K patients. Given K = k, independent inclusion makes every k-subset equally likely, so the two
procedures produce identically distributed batches (tests/test_training_dp.py checks the moments). Empty
batches are yielded like any other: skipping one would change the distribution the accountant assumes.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


class PoissonBatches:
    """Index tensors of `steps` Poisson-sampled batches over `n` examples at rate `sample_rate`.

    `rng` must be secret in real training (seeded from the operating system): a known seed reveals which
    patients were in which batch, and the privacy amplification the accountant counts on is gone.
    """

    def __init__(self, n: int, sample_rate: float, rng: np.random.Generator) -> None:
        if n < 1:
            raise ValueError("Poisson sampling needs at least one example")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"the sample rate must lie in (0, 1], not {sample_rate}")
        self.n = n
        self.sample_rate = sample_rate
        self._rng = rng

    def __call__(self, steps: int) -> Iterator[torch.Tensor]:
        sizes = self._rng.binomial(self.n, self.sample_rate, size=steps)
        for size in sizes.tolist():
            chosen = self._rng.choice(self.n, size=size, replace=False, shuffle=False)
            yield torch.from_numpy(chosen)


def shuffled_batches(n: int, batch_size: int, epochs: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The usual non-private scheme: each epoch a fresh permutation cut into batches of `batch_size`."""
    for _ in range(epochs):
        yield from torch.randperm(n, generator=generator).split(batch_size)
