import math
import random

import pytest

from ecoflap.allocation import allocate_sparsity, split_count


def test_hand_worked_proportional_case():
    # K = 100; each group first keeps ceil(100 * 0.4) = 40; the other 20 go 3:1.
    keep = allocate_sparsity([3.0, 1.0], [100, 100], sparsity=0.5, max_sparsity=0.6)
    assert keep == [55, 45]


def test_hand_worked_case_with_a_full_group():
    # K = 55; base keep [1, 10]; 44 to share: group 0 would take 43.6 but holds only 9 more,
    # so it fills up and group 1 takes the remaining 35.
    keep = allocate_sparsity([100.0, 1.0], [10, 100], sparsity=0.5, max_sparsity=0.9)
    assert keep == [10, 45]


def test_all_scores_zero_spreads_by_capacity():
    keep = allocate_sparsity([0.0, 0.0], [100, 300], sparsity=0.5, max_sparsity=1.0)
    assert keep == [50, 150]


@pytest.mark.parametrize("seed", range(200))
def test_random_cases_budget_cap_and_order(seed):
    rng = random.Random(seed)
    groups = rng.randint(1, 12)
    sizes = [rng.choice([64, 64, 256, rng.randint(1, 5000)]) for _ in range(groups)]
    scores = [rng.random() ** 3 * 10 for _ in range(groups)]
    s = rng.choice([0.1, 0.3, 0.5, 0.6, 0.7, 0.9])
    cap = min(1.0, s + rng.choice([0.0, 0.05, 0.1, 0.3]))
    keep = allocate_sparsity(scores, sizes, s, cap)
    assert sum(keep) == math.floor(sum(sizes) * (1 - s) + 1e-9)
    for k, n in zip(keep, sizes):
        assert 0 <= k <= n
        assert k >= math.floor(n * (1 - cap) + 1e-9)
        if cap > s:
            assert 1 - k / n <= cap + 1e-12
    for i in range(groups):
        for j in range(groups):
            if sizes[i] == sizes[j] and scores[i] > scores[j]:
                assert keep[i] >= keep[j]


def test_cap_below_target_is_rejected():
    with pytest.raises(ValueError, match="max per-layer sparsity"):
        allocate_sparsity([1.0, 1.0], [10, 10], sparsity=0.5, max_sparsity=0.4)


def test_sparsity_outside_range_is_rejected():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        allocate_sparsity([1.0], [10], sparsity=1.0, max_sparsity=1.0)


def test_split_count_is_exact_and_proportional():
    parts = split_count(101, [10, 20, 70])
    assert sum(parts) == 101
    assert parts == [10, 20, 71]
