"""Multi-turn chat with a model of any family: `Chatbot` (the seed's HuatuoChatbot, done properly).

    bot = Chatbot("runs/sft")                          # anything medvl.resolve accepts; LoRA applied, not merged
    bot.chat("What modality is this?", images=["ct.dcm"])   -> "CT"
    for piece in bot.stream("Which organ?"): ...       # text pieces as they are generated
    bot.history, bot.reset(), bot.undo(), bot.retry(), bot.stop()
    bot.inference(query, image_paths)                  # the seed's single-turn signature

Generation runs `model.generate` in a thread with a token streamer; `stream` yields decoded text as it grows
(never half a UTF-8 character; a few tokens decoded per token, medvl.detokenize). `stop()` (Esc in the app) ends
the answer at the next token; the partial answer is kept. Prompts go through the family's own chat template,
each image as one `<image>` block at the start of its user turn (medvl.data.collate), images loaded by the one
loader (medvl.data.images, DICOM included).

KV cache. The conversation's cache is kept between turns; the next prompt re-uses the longest prefix of tokens
whose keys/values are already in it (cropped there) and prefills only the rest. That is exact (the same
logits as a fresh prefill, tested on every family) as long as the new part holds no image: a later turn with a
new image prefills from scratch, because the vision features and (Qwen-VL) the 3-D rotary offsets of the new
tokens depend on images the cached part does not know about. The answer's own tokens are in the cache too;
the re-rendered template usually tokenizes the answer the same way, so turn N's prefill is the new question.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medvl.errors import MedvlError
from medvl.conversation import ChatImage, check_image
from medvl.data.turns import stop_token_ids
from medvl.detokenize import IncrementalDetokenizer
from medvl.models import tokenizer_of
from medvl.resolve import ModelSource, load_source, resolve_device, resolve_dtype, resolve_model

# The published chatbot's budget (HuatuoGPT-Vision cli.py: max_new_tokens 512); eval uses 256 for one letter.
CHAT_MAX_NEW_TOKENS = 512


@dataclass(frozen=True)
class GenerationOptions:
    """Greedy by default; `decoding="huatuo"` is eval's published preset (medvl.evaluate.generate.Decoding);
    an explicit temperature / top_p / repetition_penalty overrides it (temperature > 0 turns sampling on)."""

    decoding: str = "greedy"
    max_new_tokens: int = CHAT_MAX_NEW_TOKENS
    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def kwargs(self) -> dict:
        from medvl.evaluate.generate import make_decoding

        dec = make_decoding(self.decoding, max_new_tokens=self.max_new_tokens,
                            **({"seed": self.seed} if self.seed is not None else {}))
        kw = dec.generation_kwargs()
        if self.temperature is not None:
            if self.temperature < 0:
                raise MedvlError(f"temperature must be >= 0, got {self.temperature}")
            kw.update(do_sample=self.temperature > 0, temperature=self.temperature if self.temperature > 0 else None)
        if self.top_p is not None:
            if not 0 < self.top_p <= 1:
                raise MedvlError(f"top_p must be in (0, 1], got {self.top_p}")
            kw["top_p"] = self.top_p
        if self.repetition_penalty is not None:
            if self.repetition_penalty <= 0:
                raise MedvlError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
            kw["repetition_penalty"] = self.repetition_penalty
        if not kw.get("do_sample"):
            kw.update(temperature=None, top_p=None, top_k=None)  # no "sampling flags ignored" warnings
        return kw


@dataclass
class Turn:
    role: str  # user | assistant
    text: str
    images: list[ChatImage] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"role": self.role, "content": self.text, "images": [str(im.path) for im in self.images]}


@dataclass
class Reply:
    text: str
    tokens: int = 0
    seconds: float = 0.0
    first_token_s: float = 0.0  # time to first token, prefill included
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose KV came from the conversation's cache
    stopped: bool = False  # stop() ended it
    context_full: bool = False  # the model's context ended it

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed after the first token; for answers under 8 tokens (a few sub-millisecond steps, too
        short to time) the whole answer's rate, prefill included."""
        gen = self.seconds - self.first_token_s
        if self.tokens >= 8 and gen > 0:
            return (self.tokens - 1) / gen
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def render_prompt(processor, family, turns: Sequence[Turn], system: str | None = None) -> tuple[str, list]:
    """A conversation -> (the chat-templated prompt, generation prompt included; the images it shows, in order).
    Rendered exactly as training renders the same turns (medvl.data.turns: the checkpoint's template, its image
    newline and BOS rules). Chatbot and the server (medvl.server) both prompt through it, so a served answer is the
    answer `Chatbot.chat` gives."""
    from medvl.data.schema import IMAGE_PLACEHOLDER
    from medvl.data.turns import render_prompt as render

    msgs = [{"role": "system", "content": system}] if system else []
    for t in turns:
        content = IMAGE_PLACEHOLDER * len(t.images) + t.text if t.role == "user" else t.text
        msgs.append({"role": t.role, "content": content})
    images = [im.load() for t in turns for im in t.images] if family.is_vision else []
    return render(processor, msgs, family.is_vision), images


def encode_left_padded(processor, tokenizer, family, texts: Sequence[str], images: Sequence = ()):
    """A batch of rendered prompts, left-padded so each row's last real token sits in the last column (a decoder
    appends after it): with the attention mask, a row's greedy answer is the answer its prompt gets alone.
    Eval's batched answering and the server's batches both encode here. The templates hold any BOS."""
    if family.is_vision:
        return processor(text=list(texts), images=list(images) or None, padding=True, padding_side="left",
                         return_tensors="pt", add_special_tokens=False)
    return tokenizer(list(texts), padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)


class Chatbot:
    def __init__(self, model: str | Path | None = None, adapter: str | Path | None = None, device=None,
                 dtype: str | None = None, *, system: str | None = None, options: GenerationOptions | None = None,
                 image_root: str | Path = ".", source: ModelSource | None = None):
        import torch

        self.source = source or resolve_model(model, adapter=adapter)
        self.family = self.source.family
        self.dtype = resolve_dtype(dtype or "auto")
        self.device = resolve_device(device)
        self.model, self.processor = load_source(self.source, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.tokenizer = tokenizer_of(self.processor)
        self.options = options or GenerationOptions()
        self.system = system
        self.image_root = Path(image_root)
        cfg = self.model.config
        self.context_limit = getattr(cfg.get_text_config(), "max_position_embeddings", None)
        self.image_token_id = getattr(cfg, "image_token_id", None)
        self.eos = stop_token_ids(self.model, self.processor, self.family.is_vision)
        self.turns: list[Turn] = []
        self.last: Reply | None = None
        self.context_used = 0
        self._stop = threading.Event()
        self._cache = None
        self._cache_ids: list[int] = []
        if self.options.seed is not None:
            torch.manual_seed(self.options.seed)

    # -- the conversation

    @property
    def history(self) -> list[dict]:
        return [t.as_dict() for t in self.turns]

    def reset(self) -> None:
        self.turns.clear()
        self._cache, self._cache_ids, self.context_used = None, [], 0

    def undo(self) -> bool:
        """Drop the last exchange (user turn and its answer); False when there is none."""
        while self.turns and self.turns[-1].role == "assistant":
            self.turns.pop()
        if not self.turns:
            return False
        self.turns.pop()
        return True

    def stop(self) -> None:
        self._stop.set()

    def image(self, path: str | Path | ChatImage, window=None) -> ChatImage:
        """A checked image (exists, inside the root rule, decodes); raises MedvlError otherwise."""
        if not self.family.is_vision:
            raise MedvlError(f"{self.source.path} is a text-only model ({self.family.name}): it cannot see images",
                             where=str(path), fix="ask without the image, or chat with a vision-language model")
        if isinstance(path, ChatImage):
            return path
        return check_image(path, self.image_root, window)

    def chat(self, text: str, images: Sequence[str | Path | ChatImage] = ()) -> str:
        for _ in self.stream(text, images):
            pass
        return self.last.text  # stripped; the streamed pieces keep the model's own leading space

    def stream(self, text: str, images: Sequence[str | Path | ChatImage] = ()) -> Iterator[str]:
        """Add a user turn and yield the answer's text pieces; the answer joins the history when it ends."""
        text = (text or "").replace("<image>", "").strip()
        if not text and not images:
            raise MedvlError("empty message", fix="type a question (images alone need a question too)")
        if not text:
            raise MedvlError("an image needs a question", fix="type what you want to know about the image")
        checked = [im if isinstance(im, ChatImage) else self.image(im) for im in images]
        self.turns.append(Turn("user", text, checked))
        return self._answer()

    def retry(self) -> Iterator[str]:
        """Answer the last question again (sampling gives another answer; greedy the same one), streamed like
        `stream`: the old answer is replaced as the new one is read, so an unread retry changes nothing."""
        if not any(t.role == "user" for t in self.turns):
            raise MedvlError("nothing to retry", fix="ask a question first")

        def again():
            while self.turns and self.turns[-1].role == "assistant":
                self.turns.pop()
            yield from self._answer()

        return again()

    def set_window(self, window) -> int:
        """Re-window every DICOM image of the conversation; the cache is dropped (the pixels changed)."""
        n = 0
        for turn in self.turns:
            for i, im in enumerate(turn.images):
                if im.dicom:
                    turn.images[i] = ChatImage(im.path, window, True)
                    n += 1
        if n:
            self._cache, self._cache_ids = None, []
        return n

    def inference(self, query: str, image_paths: Sequence[str | Path] = ()) -> str:
        """Single turn, no history (the seed's HuatuoChatbot.inference): the conversation is left as it was."""
        saved = (self.turns, self._cache, self._cache_ids, self.context_used)
        self.turns, self._cache, self._cache_ids = [], None, []
        try:
            return self.chat(query, image_paths).strip()
        finally:
            self.turns, self.context_used = saved[0], saved[3]
            self._cache, self._cache_ids = None, []  # the model's rotary state now belongs to this prompt

    # -- generation

    def _inputs(self):
        text, images = render_prompt(self.processor, self.family, self.turns, self.system)
        if self.family.is_vision:
            return self.processor(text=[text], images=images or None, return_tensors="pt", add_special_tokens=False)
        return self.tokenizer([text], return_tensors="pt", add_special_tokens=False)

    def _answer(self) -> Iterator[str]:
        try:
            inputs = self._inputs()
        except Exception:
            self.turns.pop()
            raise
        n = int(inputs["input_ids"].shape[1])
        if self.context_limit and n >= self.context_limit:
            self.turns.pop()
            raise MedvlError(f"the conversation is {n} tokens, the model's context is {self.context_limit}",
                             fix="/clear (reset()) to start a new conversation, or send fewer or smaller images")
        return self._generate(inputs, n)

    def _reusable(self, ids: list[int]) -> int:
        """How many leading prompt tokens the kept cache holds exactly (0: prefill all)."""
        if self._cache is None:
            return 0
        same = 0
        for a, b in zip(self._cache_ids, ids):
            if a != b:
                break
            same += 1
        same = min(same, len(ids) - 1)  # generate needs at least one new token to feed
        if self.image_token_id is not None and (self.image_token_id in ids[same:]
                                                or self.image_token_id in self._cache_ids[same:]):
            # A new image (see the module docstring), or an image the cropped part held (/undo of an image turn):
            # Qwen-VL's stored rope offsets still count that image, so the new tokens would sit at wrong positions.
            return 0
        return same

    def _generate(self, inputs, n: int) -> Iterator[str]:
        import torch

        ids = inputs["input_ids"][0].tolist()
        reuse = self._reusable(ids)
        dtype = next(self.model.parameters()).dtype  # pixel values follow the weights (bf16 on a GPU)
        kwargs = {k: v.to(self.device, dtype=dtype) if v.is_floating_point() else v.to(self.device)
                  for k, v in inputs.items()}
        if reuse:
            self._cache.crop(reuse - self._cache.get_seq_length())  # negative: tokens to drop
            kwargs["past_key_values"] = self._cache
            for key in ("pixel_values", "image_grid_thw", "mm_token_type_ids", "image_sizes"):
                kwargs.pop(key, None)  # the images are all in the cached part
        gen = self.options.kwargs()
        budget = gen["max_new_tokens"]
        if self.context_limit:
            gen["max_new_tokens"] = min(budget, self.context_limit - n)
        gen["min_new_tokens"] = min(gen.get("min_new_tokens", 1), gen["max_new_tokens"])
        self._stop.clear()
        tokens: queue.Queue = queue.Queue()
        result: dict = {}
        stop = self._stop

        class Streamer:  # transformers' BaseStreamer protocol: put(prompt ids) first, then each new token
            first = True

            def put(self, value):
                if self.first:
                    self.first = False
                    return
                tokens.put(value.reshape(-1).tolist())

            def end(self):
                pass

        def stopping(input_ids, scores, **_):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        def run():
            try:
                with torch.inference_mode():
                    result["out"] = self.model.generate(
                        **kwargs, **gen, eos_token_id=self.eos, pad_token_id=self.tokenizer.pad_token_id,
                        streamer=Streamer(), stopping_criteria=[stopping], return_dict_in_generate=True)
            except BaseException as exc:  # handed to the consumer
                result["error"] = exc
            finally:
                tokens.put(None)

        t0 = time.perf_counter()
        reply = Reply("", prompt_tokens=n, reused_tokens=reuse)
        thread = threading.Thread(target=run, name="medvl-generate", daemon=True)
        thread.start()
        new: list[int] = []
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True, skip_ids=self.eos)
        drained = False
        try:
            while (chunk := tokens.get()) is not None:
                if not new:
                    reply.first_token_s = time.perf_counter() - t0
                new.extend(chunk)
                piece = "".join(detok.add(t) for t in chunk)  # never half a character; a few tokens decoded
                if piece:
                    yield piece
            rest = detok.finish()
            if rest:  # bytes that never completed a character: shown as the decoder shows them
                yield rest
            drained = True
        finally:
            if not drained:  # the consumer stopped listening (closed the generator): end generation too
                stop.set()
            thread.join()
            self._finish(reply, result, new, n, t0, budget, gen["max_new_tokens"])
        if "error" in result:
            raise result["error"]

    def _decode(self, new: list[int]) -> str:
        return self.tokenizer.decode([t for t in new if t not in self.eos], skip_special_tokens=True)

    def _finish(self, reply: Reply, result: dict, new: list[int], n: int, t0: float, budget: int, allowed: int):
        """Record the answer (also a stopped one) and keep the cache for the next turn."""
        if "out" not in result:
            self._cache, self._cache_ids = None, []
            if self.turns and self.turns[-1].role == "user":
                self.turns.pop()  # nothing was answered: the question goes back to the user
            return
        ended = bool(new) and new[-1] in self.eos
        reply.seconds = time.perf_counter() - t0
        reply.tokens = len(new)
        reply.text = self._decode(new).strip()
        reply.stopped = self._stop.is_set() and not ended
        reply.context_full = not ended and not reply.stopped and len(new) >= allowed and allowed < budget
        out = result["out"]
        self._cache = out.past_key_values
        self._cache_ids = out.sequences[0].tolist()[: self._cache.get_seq_length()]
        self.context_used = n + len(new)
        self.turns.append(Turn("assistant", reply.text))
        self.last = reply

