"""Automatic prefix caching: the keys/values of prompts' leading blocks, reused by later prompts.

A shared system prompt or few-shot prefix is prefilled once; every later prompt that begins with
the same tokens copies their keys/values instead of recomputing them (vLLM's automatic prefix
caching). A prompt is cut into blocks of BLOCK_TOKENS tokens; block i's key is a hash chained
over all blocks up to it (blake2b of the previous key and the block's token ids), so one key
stands for the whole prefix, positions included: a block is only reused at the place it was
computed, which keeps rotary and learned position embeddings right. Each entry also keeps its
tokens and they are compared on lookup, so even a hash collision cannot hand out wrong keys.

The value is the block's keys and values of every layer, (n_layer, n_kv_head, BLOCK_TOKENS, hd)
each, on the engine's device and in its dtype. Entries live in an LRU under a byte budget. A
lookup or store touches a prompt's blocks deepest first, so a block is never older than its
descendants and the least recently used entry is always a leaf: eviction never strands a
cached block behind a missing parent.

A lookup covers at most the prompt's length minus one token, so the last prompt token is always
run through the model and the first answer token's logits come from a real forward pass.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmforge.errors import InputError

if TYPE_CHECKING:  # torch stays unimported here: the CLI reads DEFAULT_MB before loading it
    from torch import Tensor, nn

    from lmforge.serve.batch_cache import BatchCache

log = logging.getLogger(__name__)

BLOCK_TOKENS = 16  # tokens per cached block (vLLM's default); prefixes are reused in whole blocks
DEFAULT_MB = 256  # see ServeSettings.prefix_cache_mb for why
_ROOT = b""  # the chain's key before the first block


@dataclass(frozen=True)
class PrefixHit:
    """The cached leading blocks of one prompt: `tokens` positions, their keys/values by block."""

    tokens: int = 0
    k: list[Tensor] = field(default_factory=list)  # (n_layer, n_kv_head, BLOCK_TOKENS, hd) each
    v: list[Tensor] = field(default_factory=list)

    def write(self, k: Tensor, v: Tensor, n: int) -> None:
        """Copies the first n (<= tokens) cached positions into k, v (n_layer, n_kv_head, >= n,
        hd): one row's storage columns where its prompt begins."""
        done = 0
        for bk, bv in zip(self.k, self.v, strict=True):
            if done >= n:
                break
            width = min(bk.size(2), n - done)
            k[:, :, done : done + width] = bk[:, :, :width]
            v[:, :, done : done + width] = bv[:, :, :width]
            done += width


NO_HIT = PrefixHit()


@dataclass
class _Block:
    tokens: tuple[int, ...]
    k: Tensor
    v: Tensor

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass(frozen=True)
class PrefixCacheStats:
    """All-time counts and the current size, for EngineStats and /metrics."""

    hits: int = 0  # lookups that found at least one block
    misses: int = 0  # lookups that found none (prompts shorter than a block + 1 included)
    hit_tokens: int = 0  # prompt positions served from the cache instead of a forward pass
    evictions: int = 0  # blocks dropped to stay under the budget
    bytes: int = 0  # keys/values held now
    blocks: int = 0  # blocks held now


NO_PREFIX_CACHE = PrefixCacheStats()  # an engine without one


class PrefixCache:
    """Block-hashed prompt keys/values in an LRU of at most `budget_bytes` (0: off, every
    lookup a silent NO_HIT); the engine's thread looks up and stores, any thread may read
    stats()."""

    def __init__(self, budget_bytes: int, block_tokens: int = BLOCK_TOKENS) -> None:
        if budget_bytes < 0 or block_tokens < 1:
            raise InputError(
                f"a prefix cache needs a budget >= 0 and a block size >= 1, got {budget_bytes} "
                f"bytes, {block_tokens} tokens"
            )
        self.budget = budget_bytes
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # oldest first
        self._bytes = 0
        self._held: frozenset[bytes] = frozenset()  # blocks eviction spares (holding())
        self._hits = self._misses = self._hit_tokens = self._evictions = 0

    @classmethod
    def for_model(cls, model: nn.Module, mb: float) -> PrefixCache:
        """The cache of an engine over `model` with `mb` MiB: off when mb is 0, or for an
        encoder-decoder, whose decoder starts from its source's cross keys/values rather than a
        prompt prefix (Seq2SeqEngine prefills its own way; the cache would never be used)."""
        if mb < 0:
            raise InputError(f"prefix_cache_mb must be >= 0 (0 = off), got {mb}")
        if mb and getattr(model.config, "is_encoder_decoder", False):
            log.info("prefix caching is for causal models; this encoder-decoder runs without")
            mb = 0
        return cls(int(mb * 2**20))

    def keys(self, prompt: list[int], blocks: int) -> list[bytes]:
        """The chained keys of the prompt's first `blocks` blocks."""
        keys, key, n = [], _ROOT, self.block_tokens
        for i in range(blocks):
            tokens = array("q", prompt[i * n : (i + 1) * n]).tobytes()
            key = hashlib.blake2b(key + tokens, digest_size=16).digest()
            keys.append(key)
        return keys

    def _cached(self, prompt: list[int], keys: list[bytes]) -> list[_Block]:
        """The leading run of the prompt's blocks that is cached (tokens checked)."""
        found: list[_Block] = []
        n = self.block_tokens
        for i, key in enumerate(keys):
            block = self._blocks.get(key)
            if block is None or block.tokens != tuple(prompt[i * n : (i + 1) * n]):
                break
            found.append(block)
        return found

    def _reusable(self, prompt: list[int]) -> tuple[list[bytes], list[_Block]]:
        """The keys of the blocks a lookup may reuse (whole blocks, the last prompt token left
        out) and the leading run of them that is cached."""
        keys = self.keys(prompt, (len(prompt) - 1) // self.block_tokens if self.budget else 0)
        return keys, self._cached(prompt, keys)

    def prefill_need(self, prompt: list[int]) -> tuple[int, bytes | None]:
        """What admitting the prompt now costs (serve/scheduler.py's admit): the positions its
        prefill runs, and the key of the first block that prefill computes and a later lookup
        could reuse (None: none); nothing counted or touched."""
        keys, found = self._reusable(prompt)
        have = len(found)
        return len(prompt) - have * self.block_tokens, keys[have] if have < len(keys) else None

    def peek(self, prompt: list[int]) -> int:
        """Prompt positions lookup() would cover now, counting and touching nothing."""
        return len(self._reusable(prompt)[1]) * self.block_tokens

    def lookup(self, prompt: list[int]) -> PrefixHit:
        """The longest cached block prefix of the prompt (at most len - 1 tokens); counted."""
        if not self.budget:
            return NO_HIT
        keys, found = self._reusable(prompt)
        if not found:
            self._misses += 1
            return NO_HIT
        self._touch(keys[: len(found)])
        self._hits += 1
        tokens = len(found) * self.block_tokens
        self._hit_tokens += tokens
        return PrefixHit(tokens, [b.k for b in found], [b.v for b in found])

    def store(self, prompt: list[int], k: Tensor, v: Tensor) -> None:
        """Keeps the prompt's whole blocks from its keys/values k, v (n_layer, n_kv_head,
        len(prompt), hd); blocks already held are only touched. Evicts least recently used
        blocks (never this prompt's) to stay under the budget; stores fewer blocks, or none,
        when even that is not enough."""
        if not self.budget:
            return
        n = self.block_tokens
        keys = self.keys(prompt, len(prompt) // n)
        held = keys[: len(self._cached(prompt, keys))]
        new = keys[len(held) :]
        self._touch(held)  # to the young end, out of the eviction's way
        if new:
            per_block = 2 * k[:, :, :n].numel() * k.element_size()
            if per_block > self.budget:
                self._turn_off(per_block)
                return
            self._evict(len(new) * per_block, spare=set(held))
            new = new[: max(0, (self.budget - self._bytes) // per_block)]
        first = len(held)
        # all copied before any goes in: running out of memory leaves no block without its parent
        blocks = [
            _Block(
                tuple(prompt[i * n : (i + 1) * n]),
                k[:, :, i * n : (i + 1) * n].clone(),
                v[:, :, i * n : (i + 1) * n].clone(),
            )
            for i in range(first, first + len(new))
        ]
        for i, block in reversed(list(enumerate(blocks, first))):  # deepest first: parents younger
            collided = self._blocks.pop(keys[i], None)  # another prompt's tokens, same key
            self._bytes += block.nbytes - (collided.nbytes if collided else 0)
            self._blocks[keys[i]] = block
        self._touch(held)

    def _turn_off(self, per_block: int) -> None:
        """A budget under one block can never store one: off (budget 0), so that admission
        stops holding prompts back a step for blocks that will never be cached."""
        log.warning(
            "prefix cache off: one %d-token block of this model's keys/values takes %.3f MiB, "
            "more than its budget of %.3f MiB; raise --prefix-cache-mb (or set it to 0)",
            self.block_tokens, per_block / 2**20, self.budget / 2**20,
        )  # fmt: skip
        self.budget = 0

    def _evict(self, need: int, spare: set[bytes]) -> None:
        """Drops least recently used blocks until `need` more bytes fit, sparing `spare` (the
        chain being stored) and the blocks held (holding()). Spared chains run from the first
        block, so every block left keeps its parent."""
        spare = spare | self._held
        while self._bytes + need > self.budget:
            victim = next((key for key in self._blocks if key not in spare), None)
            if victim is None:
                return
            self._bytes -= self._blocks.pop(victim).nbytes
            self._evictions += 1

    @contextmanager
    def holding(self, prompts: Iterable[list[int]]) -> Iterator[None]:
        """Keeps the prompts' cached blocks from eviction inside the block. A step's prefill
        is planned from peek() and run one group at a time: without this, one group's store()
        could evict blocks a later group was counted on to reuse, and that group's pass would
        run more tokens than the step's budget."""
        before, keys = self._held, set()
        for prompt in prompts:
            reusable, cached = self._reusable(prompt)
            keys.update(reusable[: len(cached)])
        self._held = before | keys
        try:
            yield
        finally:
            self._held = before

    def store_batch(self, prompts: list[list[int]], cache: BatchCache) -> None:
        """store() for each row of a just-prefilled batch (rows right-aligned, in this order).
        Out of device memory, the rows left are not kept: a cache must not fail the requests
        whose prefill succeeded."""
        import torch  # the engine's, loaded by now; the CLI imports this module without it

        for i, prompt in enumerate(prompts):
            try:
                self.store(prompt, *cache.row_kv(i, len(prompt)))
            except torch.OutOfMemoryError:
                log.warning(
                    "prefix cache: out of device memory copying a prompt's blocks (%.1f MiB "
                    "held); not kept. Lower --prefix-cache-mb if this repeats",
                    self._bytes / 2**20,
                )  # fmt: skip
                return

    def _touch(self, keys: list[bytes]) -> None:
        """Marks a chain's blocks used, deepest first: each parent ends younger than its child."""
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            hits=self._hits,
            misses=self._misses,
            hit_tokens=self._hit_tokens,
            evictions=self._evictions,
            bytes=self._bytes,
            blocks=len(self._blocks),
        )
