"""The prefix cache's store: chained block keys, the last prompt token left to the model, hash
collisions, the LRU under its byte budget, and what admission asks of it (serve/scheduler.py).
The engine and server with the cache: test_serve_prefix_cache.py."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import torch

from lmforge.serve import prefix_cache
from lmforge.serve.prefix_cache import BLOCK_TOKENS, PrefixCache, TokenChain
from lmforge.serve.scheduler import admit

B = BLOCK_TOKENS


def _kv(n_tokens: int, fill: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake keys/values (n_layer 2, n_kv_head 2, n_tokens, hd 4) whose values name their column."""
    k = torch.arange(n_tokens, dtype=torch.float32).expand(2, 2, 4, n_tokens).transpose(2, 3)
    return k * fill, -k * fill


def _request(prompt: list[int]) -> SimpleNamespace:
    """What admission reads of a waiting request: its prompt and its chain."""
    return SimpleNamespace(prompt=prompt, chain=TokenChain(prompt))


def _block_bytes() -> int:
    k, v = _kv(B)
    return k.nbytes + v.nbytes


def test_a_key_is_the_whole_prefix_and_the_last_token_is_always_left_to_the_model():
    cache = PrefixCache(10 * _block_bytes())
    prompt = list(range(3 * B))
    cache.store(prompt, *_kv(3 * B))
    assert cache.stats().blocks == 3
    # the same block after different earlier tokens is another key
    other = [99, *prompt[1:]]
    assert cache.keys(other, 3)[1:] != cache.keys(prompt, 3)[1:]
    assert cache.peek(other) == 0
    # at most len - 1 tokens: a prompt of exactly one or three blocks reuses one block fewer
    assert cache.peek(prompt[:B]) == 0
    assert cache.peek(prompt[: B + 1]) == B
    assert cache.peek(prompt) == 2 * B
    assert cache.peek([*prompt, 5]) == 3 * B
    assert cache.peek(prompt[: B - 3]) == 0  # shorter than a block
    hit = cache.lookup([*prompt, 5, 6])
    assert hit.tokens == 3 * B and len(hit.k) == 3
    k = torch.zeros(2, 2, 3 * B, 4)
    v = torch.zeros_like(k)
    hit.write(k, v, 2 * B + 3)  # the first positions only, across a block boundary
    want_k, want_v = _kv(3 * B)
    assert torch.equal(k[:, :, : 2 * B + 3], want_k[:, :, : 2 * B + 3])
    assert torch.equal(v[:, :, : 2 * B + 3], want_v[:, :, : 2 * B + 3])
    assert not k[:, :, 2 * B + 3 :].any()
    assert cache.lookup(prompt[:B]).tokens == 0
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.hit_tokens) == (1, 1, 3 * B)


def test_a_hash_collision_cannot_hand_out_another_prompts_keys(monkeypatch):
    cache = PrefixCache(10 * _block_bytes())
    cache.store(list(range(2 * B)), *_kv(2 * B))
    monkeypatch.setattr(prefix_cache, "block_key", lambda parent, tokens: b"same")
    cache._blocks = {b"same": next(iter(cache._blocks.values()))}  # one entry under every key
    assert cache.peek([1000 + i for i in range(2 * B)]) == 0  # its tokens differ: no hit


def test_a_colliding_key_is_replaced_and_its_bytes_counted_once(monkeypatch):
    cache = PrefixCache(10 * _block_bytes())
    monkeypatch.setattr(prefix_cache, "block_key", lambda parent, tokens: parent + b".")  # depth
    a, b = list(range(2 * B)), list(range(500, 500 + 2 * B))
    cache.store(a, *_kv(2 * B))
    cache.store(b, *_kv(2 * B, fill=2.0))  # every key collides with a's
    stats = cache.stats()
    assert (stats.blocks, stats.bytes) == (2, 2 * _block_bytes())
    assert cache.peek([*a, 1]) == 0
    assert torch.equal(cache.lookup([*b, 1]).k[1], _kv(2 * B, fill=2.0)[0][:, :, B:])


def test_lru_evicts_leaves_first_and_never_the_prompt_being_stored():
    cache = PrefixCache(3 * _block_bytes())
    a, b = list(range(2 * B)), list(range(500, 500 + 2 * B))
    cache.store([*a, 1], *_kv(2 * B + 1))
    cache.store([*b, 1], *_kv(2 * B + 1, fill=2.0))  # needs one of a's blocks: a's leaf goes
    stats = cache.stats()
    assert (stats.blocks, stats.evictions, stats.bytes) == (3, 1, 3 * _block_bytes())
    assert cache.peek([*a, 1]) == B  # a's first block survived, its second did not
    assert cache.peek([*b, 1]) == 2 * B
    assert torch.equal(cache.lookup([*b, 1]).k[1], _kv(2 * B, fill=2.0)[0][:, :, B:])
    cache.lookup([*a, 1])  # a's block is now the youngest: b's leaf is the oldest entry
    cache.store([*list(range(900, 900 + B)), 1], *_kv(B + 1))
    assert cache.peek([*a, 1]) == B and cache.peek([*b, 1]) == B  # b's leaf was the oldest
    # a prompt bigger than the whole budget keeps what fits and evicts nothing of its own
    long = list(range(2000, 2000 + 5 * B))
    cache.store(long, *_kv(5 * B))
    assert cache.peek(long) == 3 * B and cache.stats().bytes <= cache.budget


def test_admission_counts_uncached_tokens_and_prefills_a_new_shared_prefix_once():
    cache = PrefixCache(10 * _block_bytes())
    shared = list(range(3 * B))
    cache.store(shared, *_kv(3 * B))
    waiting = [_request([*shared, i]) for i in range(4)]
    assert cache.prefill_need(waiting[0].prompt) == (1, None)  # all but the last token cached
    assert len(admit(deque(waiting), 8, 3 * B + 2)) == 1  # whole prompts: one fits the budget
    assert len(admit(deque(waiting), 8, 3 * B + 2, cache)) == 4
    # a burst over a new shared prefix: the first prompt alone, the rest once it is cached
    new = [_request([*range(500, 500 + 2 * B), i]) for i in range(3)]
    other = _request(list(range(900, 900 + 2 * B)))
    queue = deque([new[0], other, *new[1:]])
    assert admit(queue, 8, 10_000, cache) == [new[0], other]  # new[1] waits, in order
    cache.store(new[0].prompt, *_kv(2 * B + 1))
    assert admit(queue, 8, 10_000, cache) == new[1:]
    assert cache.prefill_need(new[1].prompt) == (1, None)
    off = PrefixCache(0)
    assert admit(deque(new), 8, 10_000, off) == new  # the cache off: nothing waits
    assert off.prefill_need(new[0].prompt) == (2 * B + 1, None)


def test_a_budget_under_one_block_turns_the_cache_off_so_admission_stops_waiting(caplog):
    cache = PrefixCache(_block_bytes() - 1)
    burst = [_request([*range(2 * B), i]) for i in range(4)]
    queue = deque(burst)
    assert admit(queue, 8, 10_000, cache) == burst[:1]  # the others wait for its blocks...
    with caplog.at_level("WARNING", logger="lmforge.serve.prefix_cache"):
        cache.store(burst[0].prompt, *_kv(2 * B + 1))  # ...which can never be stored
    assert "raise --prefix-cache-mb" in caplog.text
    assert cache.budget == 0 and cache.stats().blocks == 0
    assert admit(queue, 8, 10_000, cache) == burst[1:]  # so they no longer wait
    assert cache.lookup(burst[1].prompt).tokens == 0


def test_a_block_owns_its_bytes_and_keeps_no_batch_cache_alive():
    """The budget counts each block's own bytes: a block must be a copy, never a view into the
    (much larger) batch cache it was stored from, which would stay alive behind it."""
    batch_k = torch.randn(2, 3, 2, 4 * B, 4)  # (n_layer, rows, n_kv_head, columns, hd)
    batch_v = torch.randn_like(batch_k)
    cache = PrefixCache(10 * _block_bytes())
    cache.store(list(range(2 * B)), batch_k[:, 1, :, B : 3 * B], batch_v[:, 1, :, B : 3 * B])
    blocks = cache._blocks.values()
    assert len(blocks) == 2 and cache.stats().bytes == 2 * _block_bytes()
    for block in blocks:
        for t in (block.k, block.v):
            assert t.untyped_storage().nbytes() == t.nbytes == _block_bytes() // 2
    assert torch.equal(cache.lookup(list(range(2 * B + 1))).k[1], batch_k[:, 1, :, 2 * B : 3 * B])
