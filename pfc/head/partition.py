"""Which rows of the ``C × D`` class-center matrix each rank owns."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClassPartition:
    """The rows of the ``num_classes × D`` center matrix owned by one rank.

    Rank r owns ``num_local = C//N + (r < C%N)`` rows starting at
    ``class_start = C//N*r + min(r, C%N)``: the first ``C % N`` ranks hold one row more.
    """

    num_classes: int
    world_size: int
    rank: int
    class_start: int
    num_local: int

    @property
    def class_end(self) -> int:
        return self.class_start + self.num_local


def class_partition(num_classes: int, world_size: int, rank: int) -> ClassPartition:
    """Partition ``num_classes`` rows over ``world_size`` ranks; see :class:`ClassPartition`.

    Raises ValueError when a rank would own no class (``num_classes < world_size``).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    if num_classes < world_size:
        raise ValueError(
            f"num_classes={num_classes} is smaller than the world size {world_size}: "
            "every rank must own at least one class center"
        )
    base, extra = divmod(num_classes, world_size)
    start = base * rank + min(rank, extra)
    return ClassPartition(num_classes, world_size, rank, start, base + (1 if rank < extra else 0))
