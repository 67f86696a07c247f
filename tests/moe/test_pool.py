import torch

from moecl.moe.pool import ExpertPool


def _use(pool, counts):
    pool.usage.copy_(torch.tensor(counts))


def test_freeze_most_used_follows_method_section_3():
    pool = ExpertPool(8, 4, bottleneck=4)
    _use(pool, [5, 3, 9, 0])
    assert pool.freeze_most_used(2) == [2, 0]
    assert pool.frozen.tolist() == [True, False, True, False]
    assert pool.usage.tolist() == [0, 0, 0, 0]
    _use(pool, [4, 0, 8, 7])  # expert 2 (already frozen) is among the top 2: only one new expert gets frozen
    assert pool.freeze_most_used(2) == [3]
    assert pool.frozen_at.tolist() == [0, -1, 0, 1]
    assert int(pool.tasks_ended) == 2
    _use(pool, [0, 0, 0, 0])  # a task that never used this block freezes nothing
    assert pool.freeze_most_used(2) == []
    assert [p.requires_grad for p in pool.experts[1].parameters()] == [True] * 4
    assert not any(p.requires_grad for p in pool.experts[3].parameters())
    assert len(pool.trainable_parameters()) == 4  # only expert 1's weights and biases


def test_freeze_zero_only_resets_usage():
    pool = ExpertPool(8, 3, bottleneck=4)
    _use(pool, [1, 2, 3])
    assert pool.freeze_most_used(0) == []
    assert not pool.frozen.any() and not pool.usage.any()


def test_count_adds_one_per_sample_per_selected_expert():
    pool = ExpertPool(8, 3, bottleneck=4)
    pool.count(torch.tensor([[True, True, False], [False, True, True]]))
    assert pool.usage.tolist() == [1, 2, 1]


def test_state_dict_round_trip_restores_mask_usage_and_requires_grad():
    pool = ExpertPool(8, 4, bottleneck=4)
    _use(pool, [1, 7, 2, 0])
    pool.freeze_most_used(1)
    _use(pool, [3, 1, 0, 2])
    fresh = ExpertPool(8, 4, bottleneck=4)
    fresh.load_state_dict(pool.state_dict())
    assert fresh.frozen.tolist() == [False, True, False, False]
    assert fresh.usage.tolist() == [3, 1, 0, 2]
    assert not any(p.requires_grad for p in fresh.experts[1].parameters())
    assert all(p.requires_grad for p in fresh.experts[0].parameters())
