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

Answers are kept too: when a request ends (stop, length or abort) the engine stores the whole
blocks of its prompt and answer, every token whose keys/values its cache holds (all but the last
one sampled), with the same chained keys. A chat's next turn, whose prompt is this one + the
answer + a new user message, then reuses the answer's blocks as well (vLLM keeps every full
block alike). Each row carries a TokenChain, its tokens and their block keys, so a block is
hashed once however often admission, planning, lookup and stores ask for it.

A request may carry a cache_salt (vLLM's): hashed in as the first block's parent, it gives the
request's chain keys no other salt shares, so only requests with the same salt reuse each other's
blocks. Without it, time to first token would tell one client whether another had sent a prefix.
A row of a LoRA adapter (serve/multi_lora.py) hashes the adapter's key (its name and a digest
of its weights) into its root the same way: its keys/values are another model's, never given to
the base's or another adapter's rows, nor to an adapter loaded later under the same name.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
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


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """A block's key: a hash of its parent's key and its own token ids."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def salt_root(salt: str | None, adapter: str | None = None) -> bytes:
    """The parent key of a chain's first block: _ROOT unsalted, else the salt's own hash (its
    own person, so that no unsalted block key equals it); a LoRA adapter's rows (another
    model's keys/values) hash its key (name@digest) over that, so no two adapters, nor the
    base, share."""
    root = _ROOT
    if salt is not None:
        root = hashlib.blake2b(salt.encode(), digest_size=16, person=b"lmforge-salt").digest()
    if adapter is not None:
        key = root + adapter.encode()
        root = hashlib.blake2b(key, digest_size=16, person=b"lmforge-lora").digest()
    return root


class TokenChain:
    """A row's tokens whose keys/values its cache holds (its prompt, then each answer token once
    it has been fed back) and the keys of their whole blocks, each hashed once, when first asked
    for; a salt (the request's cache_salt) roots them apart from every other salt's."""

    def __init__(
        self,
        tokens: Iterable[int],
        block_tokens: int = BLOCK_TOKENS,
        salt: str | None = None,
        adapter: str | None = None,
    ) -> None:
        self.tokens = list(tokens)
        self.block_tokens = block_tokens
        self._root = salt_root(salt, adapter)
        self._keys: list[bytes] = []
        # a lookup of it counted in the stats: a prefill retried row by row (its batched pass
        # failed) looks the row up again, and the metrics must not count its prompt twice
        self.counted = False

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, token: int) -> None:
        """A token the row's cache now holds (an answer token just fed to the model)."""
        self.tokens.append(token)

    def block(self, i: int) -> tuple[int, ...]:
        n = self.block_tokens
        return tuple(self.tokens[i * n : (i + 1) * n])

    def keys(self, blocks: int) -> list[bytes]:
        """The chained keys of the first `blocks` (whole) blocks."""
        while len(self._keys) < blocks:
            parent = self._keys[-1] if self._keys else self._root
            self._keys.append(block_key(parent, self.block(len(self._keys))))
        return self._keys[:blocks]


Tokens = Sequence[int] | TokenChain  # a prompt as a list is hashed afresh; a row's chain is not


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

    hits: int = 0  # prompts whose lookup found at least one block (a row's retries: once)
    misses: int = 0  # prompts whose lookup found none (shorter than a block + 1 included)
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

    def chain(self, tokens: Tokens) -> TokenChain:
        """`tokens` as a TokenChain of this cache's block size (a row's own chain as it is)."""
        if not isinstance(tokens, TokenChain):
            return TokenChain(tokens, self.block_tokens)
        if tokens.block_tokens != self.block_tokens:
            raise ValueError(
                f"a chain of {tokens.block_tokens}-token blocks given to a prefix cache of "
                f"{self.block_tokens}-token blocks"
            )
        return tokens

    def keys(self, prompt: Tokens, blocks: int) -> list[bytes]:
        """The chained keys of the prompt's first `blocks` blocks."""
        return self.chain(prompt).keys(blocks)

    def _cached(self, chain: TokenChain, keys: list[bytes]) -> list[_Block]:
        """The leading run of the chain's blocks that is cached (tokens checked)."""
        found: list[_Block] = []
        for i, key in enumerate(keys):
            block = self._blocks.get(key)
            if block is None or block.tokens != chain.block(i):
                break
            found.append(block)
        return found

    def _reusable(self, prompt: Tokens) -> tuple[TokenChain, list[bytes], list[_Block]]:
        """The prompt's chain, the keys of the blocks a lookup may reuse (whole blocks, the last
        prompt token left out) and the leading run of them that is cached."""
        chain = self.chain(prompt)
        keys = chain.keys((len(chain) - 1) // self.block_tokens if self.budget else 0)
        return chain, keys, self._cached(chain, keys)

    def prefill_need(self, prompt: Tokens) -> tuple[int, bytes | None]:
        """What admitting the prompt now costs (serve/scheduler.py's admit): the positions its
        prefill runs, and the key of the first block that prefill computes and a later lookup
        could reuse (None: none); nothing counted or touched."""
        chain, keys, found = self._reusable(prompt)
        have = len(found)
        return len(chain) - have * self.block_tokens, keys[have] if have < len(keys) else None

    def peek(self, prompt: Tokens) -> int:
        """Prompt positions lookup() would cover now, counting and touching nothing."""
        return len(self._reusable(prompt)[2]) * self.block_tokens

    def lookup(self, prompt: Tokens) -> PrefixHit:
        """The longest cached block prefix of the prompt (at most len - 1 tokens); counted the
        first time a row's chain is looked up (a list prompt: every time)."""
        if not self.budget:
            return NO_HIT
        chain, keys, found = self._reusable(prompt)
        first, chain.counted = not chain.counted, True
        if not found:
            self._misses += first
            return NO_HIT
        self._touch(keys[: len(found)])
        tokens = len(found) * self.block_tokens
        if first:
            self._hits += 1
            self._hit_tokens += tokens
        return PrefixHit(tokens, [b.k for b in found], [b.v for b in found])

    def store(self, prompt: Tokens, k: Tensor, v: Tensor) -> None:
        """Keeps the whole blocks of the prompt (or a row's chain: prompt and answer) from its
        keys/values k, v (n_layer, n_kv_head, len(prompt), hd); blocks already held are only
        touched. Evicts least recently used blocks (never this chain's) to stay under the
        budget; stores fewer blocks, or none, when even that is not enough."""
        if not self.budget:
            return
        n = self.block_tokens
        chain = self.chain(prompt)
        keys = chain.keys(len(chain) // n)
        held = keys[: len(self._cached(chain, keys))]
        new = keys[len(held) :]
        if new:
            per_block = 2 * k[:, :, :n].numel() * k.element_size()
            if per_block > self.budget:
                self._turn_off(per_block)
                return
            self._evict(len(new) * per_block, spare=set(held))  # touched once, below
            new = new[: max(0, (self.budget - self._bytes) // per_block)]
        first = len(held)
        # all copied before any goes in: running out of memory leaves no block without its parent
        blocks = [
            _Block(
                chain.block(i),
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
    def holding(self, prompts: Iterable[Tokens]) -> Iterator[list[int]]:
        """Keeps the prompts' cached blocks from eviction inside the block, and yields the prompt
        positions each one's lookup() will cover (counting and touching nothing). A step's
        prefill is planned from those and run one group at a time: without the hold, one group's
        store() could evict blocks a later group was counted on to reuse, and that group's pass
        would run more tokens than the step's budget."""
        before, keys, covered = self._held, set(), []
        for prompt in prompts:
            _, reusable, cached = self._reusable(prompt)
            keys.update(reusable[: len(cached)])
            covered.append(len(cached) * self.block_tokens)
        self._held = before | keys
        try:
            yield covered
        finally:
            self._held = before

    def store_batch(
        self, prompts: list[Tokens], cache: BatchCache, rows: list[int] | None = None
    ) -> None:
        """store() for rows of a batch cache (right-aligned): `rows` (default: 0, 1, ...) hold
        `prompts`' keys/values in their last len(prompt) columns. Out of device memory, the rows
        left are not kept: a cache must not fail the requests whose prefill succeeded."""
        if not self.budget:
            return
        import torch  # the engine's, loaded by now; the CLI imports this module without it

        for i, prompt in zip(rows or range(len(prompts)), prompts, strict=True):
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
