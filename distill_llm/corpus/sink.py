"""Engine output to committed shards: a Ray Data datasink over ShardWriter."""

from __future__ import annotations

from typing import Any

from ray.data import Datasink
from ray.data.block import BlockAccessor

from .shards import ShardWriter


class ShardSink(Datasink):
    """Ray Data datasink: each write task commits one shard through ShardWriter (see shards.py)."""

    def __init__(self, writer: ShardWriter, rows_per_shard: int):
        self.writer, self.rows = writer, rows_per_shard

    def write(self, blocks, ctx) -> dict[str, Any] | None:
        return self.writer.write(BlockAccessor.for_block(b).to_arrow() for b in blocks)

    @property
    def min_rows_per_write(self) -> int:
        return self.rows

    def get_name(self) -> str:
        return "WriteShards"
