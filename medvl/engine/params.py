"""What trains and how fast: freezing by parameter prefix, LoRA, per-module learning rates, the table.

Groups come from the family table (vision tower, projector, language model, LM head), for both transformers
layouts, so a flag does what it says: `freeze.language_model` freezes the language model and its head (in
HuatuoGPT-Vision's trainer `lm_head` stayed trainable and, since transformers 4.52, `model.model` also holds the
vision tower). The trainability table is printed before step 1 and saved with the run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from medvl.families import Family

GROUPS = ("vision", "projector", "language", "head")
PEFT_PREFIX = "base_model.model."


@dataclass
class Plan:
    """How each group trains: 'full', 'lora' or 'frozen', and its learning rate."""

    modes: dict[str, str]
    lrs: dict[str, float]
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_regex: str | None = None  # overrides the family's pattern


@dataclass
class Row:
    group: str
    params: int
    trainable: int
    mode: str
    lr: float | None


def group_of(name: str, family: Family) -> str:
    name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
    group = family.layout.group_of(name)
    return "language" if group == "other" else group


def apply_plan(model, family: Family, plan: Plan):
    """Freeze, wrap with LoRA where asked, and return the (possibly peft-wrapped) model."""
    lora_groups = {g for g, m in plan.modes.items() if m == "lora"}
    if lora_groups:
        from peft import LoraConfig, get_peft_model

        regex = plan.lora_regex or family.lora_regex(vision="vision" in lora_groups,
                                                     projector="projector" in lora_groups)
        config = LoraConfig(r=plan.lora_r, lora_alpha=plan.lora_alpha, lora_dropout=plan.lora_dropout,
                            target_modules=regex, task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    for name, p in model.named_parameters():
        mode = plan.modes.get(group_of(name, family), "frozen")
        if "lora_" in name:
            p.requires_grad = mode == "lora"
        else:
            p.requires_grad = mode == "full"
    return model


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
