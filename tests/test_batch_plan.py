"""The batch plan across epochs: every epoch has the same number of steps, packed epochs whose shuffle packs into
more or fewer rows than epoch 0 included, and a later epoch's plan is built once, not per micro-batch."""

import random

import pytest

import medvl.data.dataset as dataset_mod
from medvl.data.dataset import BatchPlan, epoch_batches, fit_rows


def _lengths(seed: int, n: int, max_len: int) -> list[int]:
    r = random.Random(seed)
    return [r.randint(10, max_len) if r.random() < 0.7 else r.randint(max_len // 2, max_len) for _ in range(n)]


def _epoch_rows(plan: BatchPlan, e: int) -> list[list[int]]:
    spe = plan.steps_per_epoch
    return [row for s in range(e * spe, (e + 1) * spe) for rank in range(plan.world)
            for row in plan.micro_batches(s, rank)]


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 3)])
def test_packed_epochs_with_other_row_counts_run_to_the_end(world, accum):
    lengths = _lengths(0, 1500, 900)
    budget = 1024  # long samples against the budget: the shuffles of epochs 1-3 pack into other row counts
    counts = [len(epoch_batches(lengths, seed=0, epoch=e, micro_batch=8, pack_budget=budget)) for e in range(4)]
    assert len(set(counts)) > 1, counts  # the case that ran out of rows (IndexError) before
    plan = BatchPlan(lengths, 0, 8, budget, world, accum)
    for e in range(4):
        rows = _epoch_rows(plan, e)
        assert len(rows) == plan.steps_per_epoch * world * accum
        seen = [i for row in rows for i in row]
        assert len(seen) == len(set(seen))  # no sample twice in an epoch
        assert all(sum(lengths[i] for i in row) <= budget for row in rows)
        # what an epoch leaves out is its last partial window, as epoch 0 does, plus what fit nowhere
        assert len(lengths) - len(seen) <= plan.dropped_per_epoch() + 8 * world * accum, e


def test_fit_rows_splits_when_short_and_rehomes_when_long():
    lengths = [100] * 12
    rows = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    split = fit_rows(rows, 5, lengths, 400)
    assert len(split) == 5 and sorted(i for r in split for i in r) == list(range(12))
    rows = [[0, 1], [2, 3], [4, 5], [6, 7], [8], [9], [10], [11]]
    fitted = fit_rows(rows, 4, lengths, 300)
    assert len(fitted) == 4 and sorted(i for r in fitted for i in r) == list(range(12))
    assert all(sum(lengths[i] for i in r) <= 300 for r in fitted)
    crowded = fit_rows([[0, 1, 2], [3, 4, 5], [6], [7]], 2, lengths, 300)  # nowhere to go: left past the target
    assert len(crowded[:2]) == 2 and [i for r in crowded[2:] for i in r] == [6, 7]


def test_padded_epochs_are_shuffles_of_every_sample():
    plan = BatchPlan(list(range(103)), 3, 8, None, 1, 1)  # 12 batches of 8 and one of 7
    assert plan.steps_per_epoch == 13 and plan.dropped_per_epoch() == 0
    orders = []
    for e in range(3):
        seen = [i for row in _epoch_rows(plan, e) for i in row]
        assert sorted(seen) == list(range(103))
        orders.append(seen)
    assert orders[0] != orders[1] and orders[1] != orders[2]
    two = BatchPlan(list(range(103)), 3, 8, None, 2, 1)  # 2 ranks: 6 steps, the 13th batch is left out
    assert two.steps_per_epoch == 6 and two.dropped_per_epoch() == 7


def test_a_later_epoch_is_planned_once(monkeypatch):
    calls = []
    real = dataset_mod.epoch_batches
    monkeypatch.setattr(dataset_mod, "epoch_batches", lambda *a, **k: calls.append(k["epoch"]) or real(*a, **k))
    plan = BatchPlan(_lengths(1, 400, 300), 0, 4, 1200, 1, 1)
    spe = plan.steps_per_epoch
    for step in range(spe, 3 * spe):
        plan.micro_batches(step, 0)
    assert calls == [0, 1, 2]  # before: epochs 0 and e rebuilt for every micro-batch of epoch 2 onwards
