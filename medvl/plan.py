"""Which module groups train and how: the Plan a recipe asks for, and applying it to a loaded model.

Shared by training (medvl.engine) and by the resolver (medvl.resolve), which rebuilds a step checkpoint's model
from its run's recipe.yaml the same way training built it, so the checkpoint's trainable weights fit.

Groups come from the family table (vision tower, projector, language model, LM head), for both transformers
layouts, so a flag does what it says: `freeze.language_model` freezes the language model and its head (in
HuatuoGPT-Vision's trainer `lm_head` stayed trainable and, since transformers 4.52, `model.model` also holds the
vision tower).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def group_of(name: str, family: Family) -> str:
    name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
    group = family.layout.group_of(name)
    return "language" if group == "other" else group


def plan_from_recipe(recipe, family: Family) -> Plan:
    f = recipe.freeze
    lrs = {"language": recipe.optim.lr, "head": recipe.optim.lr,
           "vision": recipe.optim.vision_lr or recipe.optim.lr, "projector": recipe.optim.projector_lr or recipe.optim.lr}
    if recipe.method == "full":
        modes = {"vision": "frozen" if f.vision_tower else "full", "projector": "frozen" if f.projector else "full",
                 "language": "frozen" if f.language_model else "full", "head": "frozen" if f.language_model else "full"}
        return Plan(modes, lrs)
    lora = recipe.lora
    # LoRA: adapters where asked; every other group stays frozen (the base weights never change).
    modes = {"language": "lora", "head": "frozen", "vision": "lora" if lora.include_vision else "frozen",
             "projector": "lora" if lora.include_projector else "frozen"}
    regex = None if lora.target == "language" else lora.target
    return Plan(modes, lrs, lora_r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, lora_regex=regex)


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
