"""The paged KV cache.

Invariants: what a sequence reads back is exactly what was written for it, token by token, whatever the other
sequences do (append, fork, free, share a prefix, get cut back); blocks are shared only between equal prefixes
whose keys/values are already written, and copied before a shared block is written; every block returns to the
pool when its sequences are freed; a request the pool cannot hold fails as a whole, leaving the cache as it was.
Local-attention layers read back their window the same way, while holding only the blocks it covers.
"""

from __future__ import annotations

import random

import pytest
import torch

from optlm.cache import CacheFull, PagedKVCache

L, H, D = 2, 2, 3
WINDOW = 6  # of layer 1 in the caches with a local layer


def _cache(num_blocks: int = 64, block_size: int = 4, local: bool = False,
           num_local_blocks: int | None = None) -> PagedKVCache:
    return PagedKVCache(L, H, D, num_blocks, block_size, dtype=torch.float64,
                        windows=[None, WINDOW] if local else None, num_local_blocks=num_local_blocks)


def _kv(tokens: list[int], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values that are a pure function of (token, position, layer), so a correct read is predictable."""
    t = torch.tensor(tokens, dtype=torch.float64)[:, None, None]
    p = torch.tensor(positions, dtype=torch.float64)[:, None, None]
    grid = torch.arange(H * D, dtype=torch.float64).view(1, H, D)
    return t * 1000 + p + grid / 100, -(t * 1000 + p) - grid / 100


def _run(cache: PagedKVCache, seq, tokens: list[int]) -> None:
    start = cache.length(seq)
    slots = cache.append(seq, tokens)
    k, v = _kv(tokens, list(range(start, start + len(tokens))))
    for layer in range(L):
        if cache.is_local(layer):  # the local pool: its own slots for the same tokens
            slots, _ = cache.local_slot_table([seq], torch.tensor([start]), len(tokens))
            slots = slots[0]
        cache.write(layer, slots, k + layer, v - layer)
    cache.publish(seq)


def _check(cache: PagedKVCache, seqs: dict) -> None:
    """Every live sequence reads back keys/values made from its own tokens at its own positions: all of them
    in the main pool (read as one padded batch), the last WINDOW - 1 (all a next token can see) in the local one."""
    names = list(seqs)
    if not names:
        return
    slots, valid = cache.slot_table(names)
    for layer in range(L):
        if not cache.is_local(layer):
            k, v = cache.read(layer, slots)  # (B, H, S, D)
        for row, name in enumerate(names):
            n = len(seqs[name])
            assert int(valid[row].sum()) == n == cache.length(name)
            start = 0
            if cache.is_local(layer):
                start = max(0, n - (WINDOW - 1))
                local, ok = cache.local_slot_table([name], torch.tensor([start]), n - start)
                assert bool(ok.all())
                k, v = cache.read(layer, local)
                row = 0
            want_k, want_v = _kv(seqs[name][start:], list(range(start, n)))
            assert torch.equal(k[row, :, :n - start].transpose(0, 1), want_k + layer)
            assert torch.equal(v[row, :, :n - start].transpose(0, 1), want_v - layer)


def test_sequences_of_any_length_read_back_their_own_tokens():
    cache, seqs = _cache(), {}
    for name, prompt in {"a": [5, 6, 7], "b": list(range(10, 21)), "c": [9]}.items():
        cache.add(name, prompt)
        _run(cache, name, prompt)
        seqs[name] = list(prompt)
    for step in range(6):  # decode steps, one token each, interleaved
        for name in seqs:
            _run(cache, name, [100 + step])
            seqs[name].append(100 + step)
    _check(cache, seqs)
    assert cache.blocks_in_use == sum(-(-len(t) // 4) for t in seqs.values())


def test_fork_shares_blocks_until_a_write_copies_the_shared_one():
    cache = _cache()
    cache.add("p", list(range(6)))
    _run(cache, "p", list(range(6)))  # 1.5 blocks
    used = cache.blocks_in_use
    cache.fork("p", "c")
    assert cache.blocks_in_use == used  # nothing copied yet
    _run(cache, "c", [77])  # writes into the shared half-full block: copied first
    _run(cache, "p", [88])
    assert cache.blocks_in_use == used + 1
    _check(cache, {"p": [*range(6), 88], "c": [*range(6), 77]})


def test_a_repeated_prompt_prefix_is_shared_not_recomputed():
    cache = _cache()
    system = list(range(40, 52))  # three full blocks
    cache.add("a", system + [1, 2])
    _run(cache, "a", system + [1, 2])
    used = cache.blocks_in_use
    cached = cache.add("b", system + [3])
    assert cached == 12  # three whole blocks found
    _run(cache, "b", [3])
    assert cache.blocks_in_use == used + 1
    _check(cache, {"a": system + [1, 2], "b": system + [3]})
    # the whole prompt cached: the last token is still left to run (its logits are needed)
    cache.free("b")
    assert cache.add("c", system) == 8
    # a freed sequence's blocks stay findable until the pool reuses them
    cache.free("a")
    cache.free("c")
    assert cache.add("d", system + [9]) == 12


def test_a_block_is_shared_only_once_its_keys_are_written():
    cache = _cache()
    prompt = list(range(20, 29))
    cache.add("a", prompt)
    cache.append("a", prompt)  # slots reserved, nothing computed yet
    assert cache.add("b", prompt) == 0
    cache.free("b")
    cache.publish("a")
    assert cache.add("c", prompt) == 8


def test_different_prefixes_never_share_even_with_equal_last_blocks():
    cache = _cache()
    cache.add("a", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    _run(cache, "a", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert cache.add("b", [9, 9, 9, 9, 5, 6, 7, 8, 0]) == 0


def test_truncate_frees_blocks_and_a_rewritten_block_is_no_longer_a_prefix():
    cache = _cache()
    cache.add("a", list(range(10)))
    _run(cache, "a", list(range(10)))
    cache.truncate("a", 6)
    assert cache.length("a") == 6 and cache.blocks_in_use == 2
    _run(cache, "a", [50, 51, 52])
    _check(cache, {"a": [*range(6), 50, 51, 52]})
    assert cache.add("b", [0, 1, 2, 3, 4, 5, 6, 7, 99]) == 4  # only the untouched first block matches


def test_a_request_the_pool_cannot_hold_fails_whole():
    cache = _cache(num_blocks=3)
    cache.add("a", list(range(8)))
    _run(cache, "a", list(range(8)))
    cache.add("b", [1])
    with pytest.raises(CacheFull, match="needs 2 more cache blocks and 1 are free"):
        cache.append("b", list(range(5)))
    assert cache.length("b") == 0 and cache.blocks_in_use == 2
    _run(cache, "b", [1])
    _check(cache, {"a": list(range(8)), "b": [1]})


@pytest.mark.parametrize("local", [False, True], ids=["global", "with_local_layer"])
def test_memory_returns_to_zero_after_many_random_requests(local):
    rng = random.Random(0)
    cache, live, count = _cache(num_blocks=40, local=local, num_local_blocks=40 if local else None), {}, 0
    seen = {"prefix hit": 0, "pool full": 0, "fork": 0}
    for _ in range(1000):
        op = rng.random()
        if op < 0.35 or not live:
            shared = [7] * 8 + [rng.randrange(50)]  # a common prefix, so blocks get shared
            prompt = rng.choice([shared, [rng.randrange(50) for _ in range(rng.randrange(1, 12))]])
            name, count = count, count + 1
            cached = cache.add(name, prompt)
            seen["prefix hit"] += cached > 0
            try:
                _run(cache, name, prompt[cached:])
                live[name] = prompt
            except CacheFull:
                seen["pool full"] += 1
                cache.free(name)
        elif op < 0.45:
            parent = rng.choice(list(live))
            name, count = count, count + 1
            cache.fork(parent, name)
            seen["fork"] += 1
            live[name] = list(live[parent])
        elif op < 0.75:
            name = rng.choice(list(live))
            token = rng.randrange(50)
            try:
                _run(cache, name, [token])
                live[name].append(token)
            except CacheFull:
                pass
        else:  # finished or cancelled
            name = rng.choice(list(live))
            cache.free(name)
            del live[name]
        if rng.random() < 0.05:
            _check(cache, live)
    _check(cache, live)
    assert min(seen.values()) >= 10, seen  # the run exercised sharing, forks and a full pool
    for name in list(live):
        cache.free(name)
    assert cache.blocks_in_use == 0 and all(r == 0 for r in cache.pool.refs)
    assert cache.local_blocks_in_use == 0


def test_local_layers_hold_only_their_window_and_share_only_what_they_still_hold():
    cache = _cache(local=True, num_local_blocks=12)  # blocks of 4 tokens, a window of 6: at most 3 local blocks
    # per sequence (the window, the token being added, the block boundary)
    prompt = list(range(1, 14))
    cache.add("a", prompt)
    _run(cache, "a", prompt)
    tokens = list(prompt)
    for step in range(30):
        _run(cache, "a", [60 + step])
        tokens.append(60 + step)
        assert cache.local_blocks_in_use <= 3 < cache.blocks_in_use
    _check(cache, {"a": tokens})
    # The first blocks of the prompt left the local pool long ago, but stay findable there until it reuses
    # them (nothing else ran): the whole prefix is shared, the window's local blocks with it.
    assert cache.add("b", prompt + [7]) == 12
    _run(cache, "b", [13, 7])
    _check(cache, {"a": tokens, "b": prompt + [7]})
    # Once other sequences have reused those local blocks, only the main pool still has the prefix: a hit
    # would leave the local layers without the window's keys, so nothing is shared.
    cache.free("b")
    for i in range(12):
        cache.add(f"x{i}", [90 + i] * 9)
        _run(cache, f"x{i}", [90 + i] * 9)
        cache.free(f"x{i}")
    assert cache.add("c", prompt + [7]) == 0
    # Cutting a sequence back past the blocks its window gave up is refused, not silently wrong.
    with pytest.raises(ValueError, match="cannot be cut back"):
        cache.truncate("a", 20)


def test_for_memory_gives_local_layers_their_window_per_sequence_and_the_rest_to_the_others():
    from optlm.models import GPTNeoConfig

    config = GPTNeoConfig(hidden_size=64, num_layers=4, num_heads=4, window_size=32, max_position_embeddings=512)
    per_block = 2 * 16 * 4 * 16 * 4  # keys and values, 16 tokens, 4 heads of 16, float32: per layer
    memory = 1000 * 4 * per_block  # an even split: 1000 blocks for each pool
    cache = PagedKVCache.for_memory(config, memory, 16, max_num_seqs=4, step_tokens=64)
    local_per_seq = -(-(32 - 1 + 64) // 16) + 1  # the window behind a step's first token, the step, a boundary
    assert cache.local_pool is not None and len(cache.local_pool.refs) == 4 * local_per_seq == 28
    # the two global layers get all the local ones do not need
    assert cache.num_blocks == (memory - 28 * 2 * per_block) // (2 * per_block) == 1972
    assert PagedKVCache.for_memory(config, memory, 16).num_blocks == 1000  # sizes unknown: an even split
