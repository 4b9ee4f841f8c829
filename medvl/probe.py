"""The verification probe export and convert share: a fixed prompt (with a synthetic image for a VLM), run
greedily in fp32, and exact per-tensor hashes.

    inputs = probe_inputs(processor, family)       # the checkpoint's own chat template, one image for a VLM
    logits, tokens = run_probe(model, inputs, 8)   # fp32 logits of the prompt, greedy token ids
    hashes = tensor_hashes(model, torch.bfloat16)  # sha256 per tensor: equal hashes = bit-identical weights

LOGITS_TOL is the one tolerance both use for "the same weights compute the same thing" in fp32.
"""

from __future__ import annotations

import hashlib

from medvl.families import Family

LOGITS_TOL = 1e-4  # fp32 compute, same weights: measured 0.0-5e-6 (merging reorders the LoRA sums)
PROBE_QUESTION = "What is the modality of this image? Please describe this picture."
PROBE_TEXT = "The patient presents with fever and cough. Is there a pleural effusion? No."


def synthetic_image():
    """A deterministic 64 x 64 RGB image (two gradients and a flat channel): 4 visual tokens on the tiny Qwen-VL
    processors, a real but cheap image for any processor."""
    from PIL import Image

    ramp = Image.linear_gradient("L").resize((64, 64))
    return Image.merge("RGB", [ramp, ramp.rotate(90), Image.new("L", (64, 64), 128)])


def probe_inputs(processor, family: Family) -> dict:
    """The verification prompt through the checkpoint's own chat template: one image and a question for a VLM,
    the question alone for a text model."""
    if family.is_vision:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROBE_QUESTION}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return dict(processor(text=[text], images=[synthetic_image()], return_tensors="pt"))
    messages = [{"role": "user", "content": PROBE_QUESTION}]
    text = (processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if processor.chat_template else PROBE_QUESTION)
    return dict(processor([text], return_tensors="pt"))


def run_probe(model, inputs: dict, max_new_tokens: int) -> tuple:
    """(fp32 logits of the prompt [T, V], `max_new_tokens` greedily generated token ids) in the model's own dtype.
    Never fewer: end of sequence is held off (min_new_tokens), so every parity check compares the same number of
    tokens; a random tiny model that happened to emit its eos at token 4 (it did, depending on which tests ran
    before in the same process) compared half of them."""
    import torch

    dtype = next(model.parameters()).dtype
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1)
    return logits, out[0, inputs["input_ids"].shape[1]:].tolist()


def is_big(model) -> bool:
    """Worth a gc.collect after `del` (which costs ~0.25 s in a process holding many objects): above 256 MB."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) > 256 * 2**20


def prompt_logits(model, inputs):
    """fp32 logits of the prompt [T, V], no generation."""
    import torch

    with torch.no_grad():
        return model(**inputs).logits[0].float()


def tensor_hashes(model, dtype=None) -> dict[str, str]:
    """sha256 of every tensor's bytes (in `dtype` if given): equality means bit-identical weights, without
    keeping a second copy of the model."""
    return {name: _tensor_sha256(t if dtype is None or not t.is_floating_point() else t.to(dtype))
            for name, t in model.state_dict().items()}


def _tensor_sha256(t) -> str:
    import torch

    t = t.detach().contiguous().cpu()
    if t.dim() == 0:
        t = t.reshape(1)
    # the buffer itself, no bytes copy (an embedding of a 7B model is ~1 GB)
    return hashlib.sha256(t.view(torch.uint8).numpy() if t.numel() else b"").hexdigest()
