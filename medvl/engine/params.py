"""What trains and how fast: the trainability table and the per-module learning-rate groups of a Plan (the plan
itself, freezing and LoRA, live in medvl.plan, shared with the resolver). The trainability table is printed
before step 1 and saved with the run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from medvl.families import Family
from medvl.plan import GROUPS, Plan, group_of


@dataclass
class Row:
    group: str
    params: int
    trainable: int
    mode: str
    lr: float | None


def trainability(model, family: Family, plan: Plan) -> list[Row]:
    rows = {g: Row(g, 0, 0, plan.modes.get(g, "frozen"), None) for g in GROUPS}
    for name, p in model.named_parameters():
        row = rows[group_of(name, family)]
        n = getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions weights at load: numel() is 0 there
        row.params += n
        if p.requires_grad:
            row.trainable += n
    for row in rows.values():
        row.lr = plan.lrs.get(row.group) if row.trainable else None
    return [r for r in rows.values() if r.params]


def rows_as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


def param_groups(model, family: Family, plan: Plan, weight_decay: float) -> list[dict]:
    """AdamW groups: per module group learning rate; weight decay on matrices only (biases and norm weights,
    the 1-D tensors, get none; HuatuoGPT's name filter missed Qwen's `norm` weights)."""
    buckets: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        buckets.setdefault((group_of(name, family), p.ndim >= 2), []).append(p)
    return [{"params": ps, "lr": plan.lrs[g], "weight_decay": weight_decay if decay else 0.0, "name": f"{g}"}
            for (g, decay), ps in sorted(buckets.items())]
