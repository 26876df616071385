"""The batch sampler that keeps the parallel utterances of a sentence (its recordings in several languages) in one
batch, so that the OT loss finds pairs, while every epoch still visits every row once."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from itertools import islice

import numpy as np
from torch.utils.data import Sampler

from .rows import group_by_sentence


def _interleave(group: list[int], languages: Sequence[str], rng: np.random.Generator) -> list[int]:
    """A sentence's utterances in a random round-robin over their languages: any two consecutive ones differ in
    language while possible, so a prefix of two or more (a chunk cut off at a batch boundary) holds a pair."""
    by_language: dict[str, list[int]] = {}
    for index in rng.permutation(group).tolist():
        by_language.setdefault(languages[index], []).append(index)
    queues = list(by_language.values())
    return [queue[turn] for turn in range(max(map(len, queues))) for queue in queues if turn < len(queue)]


def _pack(units: list[list[int]], batch_size: int, lookahead: int) -> list[list[int]]:
    """Fill batches in order with whole units; when the next unit does not fit the free space, take the first of the
    next `lookahead` units that does; when none does, split the next unit at the free space. Every batch but the
    last is full, which makes the number of batches exact."""
    queue, batches, batch = deque(units), [], []
    while queue:
        space = batch_size - len(batch)
        fitting = next((k for k, unit in enumerate(islice(queue, lookahead)) if len(unit) <= space), None)
        if fitting is None:
            unit = queue.popleft()
            batch += unit[:space]
            queue.appendleft(unit[space:])
        else:
            batch += queue[fitting]
            del queue[fitting]
        if len(batch) == batch_size:
            batches.append(batch)
            batch = []
    if batch:
        batches.append(batch)
    return batches


class ParallelBatchSampler(Sampler[list[int]]):
    """Batches of row indices in which the utterances of a sentence (in different languages) travel together.

    Each epoch covers every row exactly once. With probability `pair_ratio` a sentence's utterances form one unit
    that is placed in a single batch (a unit larger than the space left is cut into chunks whose first two
    utterances differ in language, so every chunk of two or more holds an OT pair); otherwise they are scattered as
    single utterances. Rows without a translation are ordinary members: their labels are all -100, but they
    join the OT pairs (zero-shot languages). Same (seed, epoch) -> same batches; `set_epoch` is called by the
    Trainer / accelerate at each epoch.

    Under DDP, accelerate wraps this sampler in `BatchSamplerShard`, which hands each process whole batches (batch
    i goes to process i % world_size), so pairs never straddle processes; every process builds the same batches
    because the order depends only on (seed, epoch). `DataLoaderShard.set_epoch` does not reach a sampler inside a
    `BatchSamplerShard`; transformers' Trainer calls ours explicitly, a custom loop must do the same.

    Args:
        sentence_ids: per row, its sentence id.
        languages: per row, its language.
        batch_size: utterances per batch.
        pair_ratio: probability that a sentence's utterances are kept together in an epoch.
        seed: base seed; the epoch is mixed in.
        drop_last: drop the last, smaller batch.
        lookahead: how many later units to search for one that fills the free space of a batch.
    """

    def __init__(
        self,
        sentence_ids: Sequence[str],
        languages: Sequence[str],
        batch_size: int,
        pair_ratio: float = 1.0,
        seed: int = 0,
        drop_last: bool = False,
        lookahead: int = 64,
    ) -> None:
        if len(sentence_ids) != len(languages):
            raise ValueError(f"Got {len(sentence_ids)} sentence ids but {len(languages)} languages; give one each.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if not 0.0 <= pair_ratio <= 1.0:
            raise ValueError(f"pair_ratio is a probability in [0, 1], got {pair_ratio}.")
        self.languages = list(languages)
        self.groups = group_by_sentence(list(sentence_ids))
        self.batch_size = batch_size
        self.pair_ratio = pair_ratio
        self.seed = seed
        self.drop_last = drop_last
        self.lookahead = lookahead
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        num_rows = len(self.languages)
        return num_rows // self.batch_size if self.drop_last else math.ceil(num_rows / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        units: list[list[int]] = []
        for group in self.groups:
            multilingual = len({self.languages[index] for index in group}) > 1
            if multilingual and rng.random() < self.pair_ratio:
                units.append(_interleave(group, self.languages, rng))
            else:
                units.extend([index] for index in group)
        units = [units[k] for k in rng.permutation(len(units))]
        batches = _pack(units, self.batch_size, self.lookahead)
        yield from batches[: len(self)]


__all__ = ["ParallelBatchSampler"]
