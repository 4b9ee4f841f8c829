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


def test_a_packed_run_trains_every_epoch_to_the_end(tiny_dir, tmp_path):
    """Three packed epochs end to end, where epochs 1 and 2 pack into fewer rows than epoch 0 (28, 27, 26): before,
    the run died with an IndexError in epoch 1."""
    import json

    from medvl.config import load_recipe
    from medvl.data.dataset import EncodedDataset, index_prepared
    from medvl.data.prepare import prepare
    from medvl.engine.batches import _measure_lengths
    from medvl.engine.metrics import ListSink
    from medvl.engine.train import train
    from medvl.families import get_family
    from medvl.models import load_processor

    r = random.Random(5)
    rows = [{"_id": f"d{i}", "conversation": [{"role": "user", "content": "symptom " * r.randint(1, 4)},
            {"role": "assistant", "content": " ".join(["rest"] * r.choice([1, 2, 3, 8, 14, 20]))}]} for i in range(40)]
    (tmp_path / "disc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    prepare([tmp_path / "disc.jsonl"], tmp_path / "data")
    model, fam = tiny_dir("causal-lm"), get_family("causal-lm")
    ds = EncodedDataset(index_prepared([tmp_path / "data"]), load_processor(model, fam), fam, loss_mask="all",
                        max_seq_len=64, load_image=None)
    counts = [len(epoch_batches(_measure_lengths(ds), seed=0, epoch=e, micro_batch=1, pack_budget=64))
              for e in range(3)]
    assert counts[1] < counts[0] and counts[2] < counts[0], counts
    recipe = load_recipe("tiny_cpu", [f"model.base={model}", f"data.train=[{tmp_path / 'data'}]",
                                      f"output.dir={tmp_path / 'run'}", "train.max_steps=null", "train.epochs=3",
                                      "train.save_every=null", "train.eval_every=null", "data.val_fraction=null",
                                      "data.packing=true", "data.max_seq_len=64", "train.micro_batch_size=1",
                                      "train.seed=0", "train.log_every=1", "optim.warmup_steps=1"])
    sink = ListSink()
    res = train(recipe, sinks=[sink])
    start = next(e for e in sink.events if e["kind"] == "start")
    assert start["steps_per_epoch"] == counts[0] and res.steps == 3 * counts[0]
    assert [e["step"] for e in sink.events if e["kind"] == "train"] == list(range(1, res.steps + 1))
