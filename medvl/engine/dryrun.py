"""`medvl train --dry-run`: everything about a run that can be known without training it.

The model is built on the meta device (no memory, no weights read), so a 7B or 72B plan prints in seconds on a
laptop: the real trainability table, the launch command, and a memory estimate per GPU.

Memory estimate per GPU (bytes per parameter, then divided by the ZeRO sharding):
  weights 2 (bf16/fp16) or 4 (fp32); gradients of trainable parameters, same width; AdamW two fp32 moments (8)
  plus an fp32 master copy (4) when weights are 16-bit and trained fully through DeepSpeed; ZeRO-2 shards
  gradients and optimizer states across GPUs, ZeRO-3 also the weights. Activations: ~34 x hidden bytes per token
  per layer in 16 bit without checkpointing (the Korthikanti et al. count without the attention-score term,
  which sdpa/flash attention do not keep), ~2 x hidden with checkpointing. Logits: the loss holds ~12 bytes
  per logit (medvl.engine.loss.BYTES_PER_LOGIT) for one chunk of at most 1,024 supervised tokens x vocabulary
  (the chunked loss; the plain one held the whole micro-batch: 4096 x 151,936 x 12 B = 7.5 GB). An estimate,
  labelled as one.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DryRun:
    family: str
    resolved_yaml: str
    launch: list[str] | None
    table: list[dict]
    memory: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def plan_config(base: str, family):
    """(transformers config, note) to plan from: the base's own config.json (local or in the Hugging Face cache);
    when the base does not exist yet (stage 2's base is stage 1's output) the family's reference checkpoint's
    config from the cache, with a note saying so; otherwise a MedvlError that says how to get either."""
    from medvl.errors import MedvlError
    from medvl.families import read_config

    try:
        return config_from_dict(read_config(base)), None
    except MedvlError as exc:
        ref = family.extra.get("reference")
        if ref is None:
            raise
        try:
            raw = read_config(ref)
        except MedvlError:
            raise MedvlError(
                f"'{base}' is not on disk, so the dry run has no config to plan from", where=str(base),
                fix=f"create or download the model first ({exc.fix}); or fetch only the config of the "
                    f"{family.name} reference checkpoint and the dry run plans with its sizes: "
                    f"`hf download {ref} config.json`") from None
        return config_from_dict(raw), (f"'{base}' is not on disk yet: planned from the config of {ref} (Hugging "
                                       "Face cache), the family's reference checkpoint; the sizes are that model's")


def config_from_dict(raw: dict):
    """A transformers config from a config.json dict, with the head tied exactly as the checkpoint stores it.

    transformers 5 writes `tie_word_embeddings` into every config it saves. A config.json with the key at no level
    (InternVL3-1B-hf) was written by transformers 4, where every supported text model's default was untied, and
    its checkpoint stores `lm_head.weight` on its own; transformers 5's default would tie the head and count
    802,293,120 parameters instead of the checkpoint's 938,193,024 (the 151,674 x 896 head)."""
    from transformers import AutoConfig

    kwargs = {k: v for k, v in raw.items() if k != "model_type"}
    config = AutoConfig.for_model(raw["model_type"], **kwargs)
    if "tie_word_embeddings" not in raw and "tie_word_embeddings" not in (raw.get("text_config") or {}):
        untie(config)
    return config


def untie(config) -> None:
    config.tie_word_embeddings = False
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config:
        text.tie_word_embeddings = False


def meta_model(config, family):
    """The model of a config on the meta device: every parameter's shape, no memory, no weights read."""
    import torch

    from medvl.models import model_class

    cls = model_class(family)
    with torch.device("meta"):
        if family.model_class == "AutoModelForCausalLM":
            return cls.from_config(config)
        return cls._from_config(config)


def plan_run(recipe, *, worker: str) -> DryRun:
    """The dry run of a recipe; `worker` is the module each launched process runs (see engine/launch.py)."""
    from medvl.config import recipe_to_yaml
    from medvl.engine.launch import launch_command, needs_launch
    from medvl.engine.params import rows_as_dicts, trainability
    from medvl.plan import apply_plan, plan_from_recipe
    from medvl.families import detect_family, get_family
    from pathlib import Path

    family = get_family(recipe.model.family) if recipe.model.family else detect_family(recipe.model.base)
    config, note = plan_config(recipe.model.base, family)
    model = meta_model(config, family)
    plan = plan_from_recipe(recipe, family)
    model = apply_plan(model, family, plan)
    table = rows_as_dicts(trainability(model, family, plan))
    launch = None
    if recipe.world_size > 1 or needs_launch(recipe):
        launch = launch_command(recipe, Path(recipe.output.dir) / "launch-recipe.yaml", worker=worker)
    memory = estimate_memory(recipe, table, config)
    notes = [note] if note else []
    notes += data_problems(recipe)
    return DryRun(family.name, recipe_to_yaml(recipe), launch, table, memory, notes=notes)


def data_problems(recipe) -> list[str]:
    """What the real run would refuse about the recipe's prepared data, as notes: the dry run plans without data
    (a job script is often checked before the data is in place), but a typo in data.train should show now."""
    from medvl.data.dataset import verify_recipe_data
    from medvl.errors import MedvlError

    try:
        verify_recipe_data(recipe)
    except MedvlError as exc:
        return [f"the run would stop here: {exc.what}" + (f" (fix: {exc.fix})" if exc.fix else "")]
    return []


def estimate_memory(recipe, table: list[dict], config) -> dict:
    from medvl.engine.loss import logits_bytes

    width = 4 if recipe.model.dtype == "fp32" else 2
    total = sum(r["params"] for r in table)
    trainable = sum(r["trainable"] for r in table)
    world = recipe.world_size
    stage = {"deepspeed-zero2": 2, "deepspeed-zero3": 3, "fsdp": 3}.get(recipe.distributed.strategy, 0)
    stage = stage if world > 1 else 0
    weights = total * width
    grads = trainable * width
    optim = trainable * (8 + (4 if width == 2 and recipe.method == "full" and stage else 0))
    if recipe.method == "qlora":
        weights = total * 0.55  # NF4 + double quantization ~0.55 byte/param
    if stage >= 2:
        grads /= world
        optim /= world
    if stage == 3:
        weights /= world
    text = getattr(config, "text_config", config)
    hidden, layers = text.hidden_size, text.num_hidden_layers
    tokens = recipe.train.micro_batch_size * recipe.data.max_seq_len
    per_token_layer = (2 if recipe.train.gradient_checkpointing else 34) * hidden
    activations = tokens * layers * per_token_layer * (2 if width == 2 else 4) / 2
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", 0)
    gib = 2**30
    parts = {"weights": weights / gib, "gradients": grads / gib, "optimizer": optim / gib,
             "activations (est.)": activations / gib, "logits (loss, est.)": logits_bytes(tokens, vocab) / gib}
    parts["total per GPU (est.)"] = sum(parts.values())
    return {k: round(v, 2) for k, v in parts.items()}
