import dataclasses
import threading

import pytest

from lmforge.serve.cache import ResponseCache, cache_key, is_deterministic, model_identity


@dataclasses.dataclass(frozen=True)
class Params:  # the engine's SamplingParams shape (any dataclass or mapping is accepted)
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None


def test_key_is_none_unless_deterministic():
    assert cache_key("m", "hi", Params(temperature=0.7)) is None
    assert cache_key("m", "hi", Params(temperature=0.0)) is not None
    assert cache_key("m", "hi", Params(temperature=0.7, seed=3)) is not None
    assert is_deterministic({"temperature": 0}) and not is_deterministic({"temperature": 0.5})


def test_key_changes_with_every_output_changing_input():
    base = cache_key("m@abc", [1, 2, 3], Params(temperature=0))
    assert base == cache_key("m@abc", [1, 2, 3], Params(temperature=0))  # stable
    variants = [
        cache_key("m@abd", [1, 2, 3], Params(temperature=0)),
        cache_key("m@abc", [1, 2, 4], Params(temperature=0)),
        cache_key("m@abc", "1 2 3", Params(temperature=0)),
    ]
    for field, value in [
        ("max_tokens", 17),
        ("top_p", 0.9),
        ("top_k", 5),
        ("stop", ("\n",)),
        ("seed", 1),
        ("logprobs", 2),
    ]:
        variants.append(cache_key("m@abc", [1, 2, 3], Params(temperature=0, **{field: value})))
    assert len({*variants, base}) == len(variants) + 1
    # seeded sampling: the seed and the temperature are both part of the key
    assert cache_key("m", "p", Params(temperature=0.5, seed=1)) != cache_key(
        "m", "p", Params(temperature=0.6, seed=1)
    )


def test_hits_misses_and_lru_eviction_order():
    cache = ResponseCache(max_entries=2)
    assert cache.get("a") is None and cache.misses == 1
    cache.put("a", "A")
    cache.put("b", "B")
    assert cache.get("a") == "A"  # a is now most recent: b is the next to go
    cache.put("c", "C")
    assert cache.keys() == ["a", "c"]
    assert cache.get("b") is None
    assert (cache.hits, cache.misses, cache.evictions) == (1, 2, 1)
    assert cache.hit_rate == pytest.approx(1 / 3)
    cache.put("a", "A2")  # replacing refreshes without growing
    assert len(cache) == 2 and cache.get("a") == "A2" and cache.keys() == ["c", "a"]
    # a non-deterministic request (key None) is neither stored nor counted
    cache.put(None, "x")
    assert cache.get(None) is None and (cache.hits, cache.misses) == (2, 2)


def test_byte_bound_evicts_oldest_and_skips_oversized_values():
    cache = ResponseCache(max_entries=100, max_bytes=10)
    cache.put("a", "aaaa")
    cache.put("b", "bbbb")
    cache.put("c", "cccc")  # 12 bytes > 10: a goes
    assert cache.keys() == ["b", "c"] and cache.nbytes == 8
    cache.put("big", "x" * 11)
    assert "big" not in cache and cache.keys() == ["b", "c"]
    cache.put("é", "éé")  # sizes are UTF-8 bytes (4), not characters
    assert cache.nbytes == 8 and cache.keys() == ["c", "é"]
    with pytest.raises(ValueError):
        ResponseCache(max_entries=0)


def test_thread_safe_counts_and_bound():
    cache = ResponseCache(max_entries=50)

    def worker(t):
        for i in range(2000):
            key = f"k{(i * 7 + t) % 80}"
            if cache.get(key) is None:
                cache.put(key, i)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert cache.hits + cache.misses == 8000
    assert len(cache) == 50 == len(cache.keys())


def test_model_identity_follows_directory_content(tmp_path):
    d = tmp_path / "final"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"weights-1")
    first = model_identity("sft", d)
    assert first.startswith("sft@") and first == model_identity("sft", d)
    (d / "model.safetensors").write_bytes(b"weights-2")
    assert model_identity("sft", d) != first
