"""The multi-hash index finds exactly the pairs a brute-force scan finds."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.stages.dedup import find_duplicates, near_pairs


def _brute_force(hashes: np.ndarray, threshold: int) -> set[tuple[int, int]]:
    x = hashes[:, None] ^ hashes[None, :]
    dist = np.unpackbits(x.view(np.uint8), axis=-1).reshape(len(hashes), len(hashes), 64).sum(-1)
    i, j = np.nonzero(np.triu(dist <= threshold, k=1))
    return set(zip(i.tolist(), j.tolist()))


@pytest.mark.parametrize("threshold", [0, 2, 4, 7])
def test_index_matches_brute_force(threshold):
    rng = np.random.default_rng(threshold)
    base = rng.integers(0, 2**63, size=300, dtype=np.uint64) * np.uint64(2) + rng.integers(
        0, 2, 300, dtype=np.uint64
    )
    flips = [np.uint64(1) << np.uint64(b) for b in range(64)]
    near = []
    for h in base[:100]:  # copies at distance 1..threshold+2: some inside, some outside
        d = int(rng.integers(1, threshold + 3))
        for b in rng.choice(64, size=d, replace=False):
            h = h ^ flips[b]
        near.append(h)
    hashes = np.concatenate([base, np.array(near, dtype=np.uint64)])
    i, j, _ = near_pairs(hashes, threshold)
    assert set(zip(i.tolist(), j.tolist())) == _brute_force(hashes, threshold)


def test_survivor_is_the_smallest_key_and_reasons_are_recorded():
    table = pa.table({
        "key": ["a", "b", "c", "d", "e"],
        "sha256": ["x", "y", "x", "z", "w"],
        "phash": pa.array([0, 0b111, 0, 2**40, 2**64 - 1], pa.uint64()),
    })  # fmt: skip
    result = find_duplicates(table, 4).to_pylist()
    by_key = {r["key"]: (r["duplicate_of"], r["reason"], r["distance"]) for r in result}
    assert by_key == {
        "a": (None, None, None),
        "b": ("a", "near", 3),
        "c": ("a", "exact", 0),
        "d": ("a", "near", 1),
        "e": (None, None, None),
    }


def test_reason_is_the_relation_to_the_survivor_not_to_the_chain():
    # c is a byte copy of b, b a near duplicate of a: c reaches a through b, and is a near
    # duplicate of a (distance 3), not an exact one.
    table = pa.table({
        "key": ["a", "b", "c"],
        "sha256": ["x", "y", "y"],
        "phash": pa.array([0, 0b111, 0b111], pa.uint64()),
    })  # fmt: skip
    by_key = {r["key"]: r for r in find_duplicates(table, 4).to_pylist()}
    assert (by_key["b"]["duplicate_of"], by_key["b"]["reason"], by_key["b"]["distance"]) == (
        "a", "near", 3)  # fmt: skip
    assert (by_key["c"]["duplicate_of"], by_key["c"]["reason"], by_key["c"]["distance"]) == (
        "a", "near", 3)  # fmt: skip


def test_many_byte_copies_give_the_verdicts_of_an_all_pairs_union():
    """Pictures behind many URLs (groups of byte copies) and near copies between groups: the
    verdicts equal a brute-force union over every pair of rows (sha equal or pHash close)."""
    rng = np.random.default_rng(5)
    originals = rng.integers(0, 2**63, size=40, dtype=np.uint64)
    originals[1::4] = originals[0::4] ^ np.uint64(0b101)  # near copies of other originals
    rows = rng.integers(0, len(originals), size=400)  # each picture behind ~10 URLs
    keys = [f"{i:05d}" for i in range(len(rows))]
    shas = [f"sha{r}" for r in rows]
    hashes = originals[rows]
    table = pa.table({"key": keys, "sha256": shas, "phash": pa.array(hashes, pa.uint64())})
    result = {r["key"]: r for r in find_duplicates(table, 4).to_pylist()}

    parent = list(range(len(rows)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    close = _brute_force(hashes, 4)
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            if shas[i] == shas[j] or (i, j) in close:
                a, b = root(i), root(j)
                parent[max(a, b)] = min(a, b)
    for i, key in enumerate(keys):
        s = root(i)
        expected = None if s == i else keys[s]
        assert result[key]["duplicate_of"] == expected, key
        if expected is not None:
            reason = "exact" if shas[i] == shas[s] else "near"
            assert result[key]["reason"] == reason, key
    assert sum(r["reason"] == "near" for r in result.values()) > 0
