"""Keys and values of prompt prefixes, kept so that a later prompt starting the same way
skips computing them.

A prompt is cut into blocks of `block` tokens. Block `i` is named by a chained digest: the
cache's namespace, block `i - 1`'s name and block `i`'s token ids, so a name stands for the
whole prefix up to the end of that block. After a sequence's prompt is in its cache row,
its whole blocks are copied into a pool (`store`); a new prompt looks up the longest run of
its blocks the pool holds (`lookup`) and has them copied into its row (`restore`), then
computes only the rest. The pool is a fixed number of blocks of untouched memory, filled as
used; the least recently used block goes first when it is full. Lookups touch a prefix's
blocks from the last to the first, so a prefix is evicted from its end and the blocks that
stay still form a prefix.

The namespace is the version the engine serves (its fingerprint and the engine's own
number): the pool belongs to one engine, which serves one version, and a name computed for
another version can never match. A swap can therefore never serve keys and values computed
with the old weights. Engine thread only.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hotweights.engine.kv import KVRows, KVShape, buffer_bytes, layer_buffers

if TYPE_CHECKING:
    import torch


@dataclass
class PrefixStats:
    lookups: int = 0
    hit_tokens: int = 0
    """Prompt tokens restored from the pool rather than computed."""
    stored_blocks: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    """A pool of `blocks` blocks of `block` tokens for `shape`'s layers."""

    def __init__(
        self,
        shape: KVShape,
        blocks: int,
        block: int,
        dtype: torch.dtype,
        device: str,
        namespace: str,
    ) -> None:
        self.keys, self.values = layer_buffers(shape, blocks, block, dtype, device)
        self.block = block
        self.blocks = blocks
        self.device = device
        self.stats = PrefixStats()
        self._namespace = namespace.encode()
        self._slots: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        """Block name -> pool slot, least recently used first."""
        self._free = list(range(blocks - 1, -1, -1))

    def nbytes(self) -> int:
        return buffer_bytes(self.keys, self.values)

    def names(self, ids: list[int], whole_blocks: int, salt: bytes = b"") -> list[bytes]:
        """The chained names of the first `whole_blocks` blocks of `ids`, computed with
        `salt` (a LoRA adapter version's key: its rows hold other keys and values)."""
        names: list[bytes] = []
        previous = self._namespace + b"|" + salt
        for index in range(whole_blocks):
            tokens = ids[index * self.block : (index + 1) * self.block]
            digest = hashlib.blake2b(previous, digest_size=16)
            digest.update(b",".join(str(t).encode() for t in tokens))
            previous = digest.digest()
            names.append(previous)
        return names

    def lookup(self, ids: list[int], salt: bytes = b"") -> list[int]:
        """Pool slots of the longest cached run of `ids`'s leading blocks, leaving at least
        one token of `ids` to compute (its logits start the completion)."""
        self.stats.lookups += 1
        found: list[int] = []
        for name in self.names(ids, (len(ids) - 1) // self.block, salt):
            slot = self._slots.get(name)
            if slot is None:
                break
            found.append(slot)
        names = self.names(ids, len(found), salt)
        for name in reversed(names):  # the first block ends most recently used
            self._slots.move_to_end(name)
        self.stats.hit_tokens += len(found) * self.block
        return found

    def restore(self, kv: KVRows, row: int, slots: list[int]) -> None:
        """Copy the blocks in `slots` into columns `[0, len(slots) * block)` of `row`."""
        import torch

        if not slots:
            return
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        width = len(slots) * self.block
        for layer, (keys, values) in enumerate(zip(self.keys, self.values, strict=True)):
            row_keys, row_values = kv.layer(layer)
            # (blocks, kv_heads, block, head_dim) -> (kv_heads, blocks * block, head_dim)
            row_keys[row, :, :width] = keys[index].transpose(0, 1).flatten(1, 2)
            row_values[row, :, :width] = values[index].transpose(0, 1).flatten(1, 2)

    def store(self, kv: KVRows, row: int, ids: list[int], salt: bytes = b"") -> None:
        """Keep the whole blocks of `ids` (named with `salt`, as `lookup`), whose keys and
        values fill the start of `row`, that the pool does not hold yet."""
        import torch

        whole = len(ids) // self.block
        names = self.names(ids, min(whole, self.blocks), salt)
        new = [(i, name) for i, name in enumerate(names) if name not in self._slots]
        if not new:
            return
        slots = [self._slot(name) for _, name in new]
        target = torch.tensor(slots, dtype=torch.long, device=self.device)
        picked = torch.tensor([i for i, _ in new], dtype=torch.long, device=self.device)
        width = len(names) * self.block
        for layer, pool in enumerate(zip(self.keys, self.values, strict=True)):
            for block_pool, buffer in zip(pool, kv.layer(layer), strict=True):
                # (kv_heads, width, d) -> (kv_heads, blocks, block, d) -> (new, kv_heads, block, d)
                columns = buffer[row, :, :width].unflatten(1, (-1, self.block))  # type: ignore[no-untyped-call]
                block_pool[target] = columns[:, picked].transpose(0, 1)
        for name in reversed(names):
            if name in self._slots:
                self._slots.move_to_end(name)
        self.stats.stored_blocks += len(new)

    def _slot(self, name: bytes) -> int:
        if self._free:
            slot = self._free.pop()
        else:
            _, slot = self._slots.popitem(last=False)
            self.stats.evicted_blocks += 1
        self._slots[name] = slot
        return slot
