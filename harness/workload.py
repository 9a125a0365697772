"""What the load sends: prompts of exact token lengths, datasets, and output lengths.

Prompt lengths are calibrated against the server's own `/tokenize` (the tokenizer
that will count them), so "512 in" means 512 prompt tokens as the server counts
them, chat template included. Everything is seeded: the same seed gives the same
sequence of requests.
"""
from __future__ import annotations

import json
import pathlib
import random
import re
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable

from harness.errors import UsageError

# The seed plan's continuous load test sends these three prompts, 128 tokens out.
SOAK_PROMPTS = ["Explain quantum computing", "Write a Python sort", "What is NVLink?"]

_WORDS = ("time year people way day man thing woman life child world school state family "
          "student group country problem hand part place case week company system program "
          "question work government number night point home water room mother area money story "
          "fact month lot right study book eye job word business issue side kind head house "
          "service friend father power hour game line end member law car city community name "
          "president team minute idea kid body information back parent face others level office "
          "door health person art war history party result change morning reason research girl "
          "guy moment air teacher force education").split()


@dataclass
class Prompt:
    """One request's input: chat messages or a completion prompt, and its lengths."""

    messages: list[dict] | None = None
    text: str | None = None
    input_tokens: int | None = None   # as the server's tokenizer counts them, when known
    max_tokens: int = 128
    min_tokens: int | None = None
    ignore_eos: bool = True

    def body(self, model: str, chat: bool, extra: dict | None = None) -> dict:
        body: dict = {"model": model, "stream": True, "max_tokens": self.max_tokens,
                      "stream_options": {"include_usage": True}}
        if chat:
            body["messages"] = self.messages if self.messages is not None else [
                {"role": "user", "content": self.text or ""}]
        else:
            body["prompt"] = self.text if self.text is not None else "\n".join(
                str(m.get("content", "")) for m in self.messages or [])
        if self.ignore_eos:
            body["ignore_eos"] = True
            body["min_tokens"] = self.max_tokens if self.min_tokens is None else self.min_tokens
        elif self.min_tokens:
            body["min_tokens"] = self.min_tokens
        if extra:
            body.update(extra)
        return body


TokenCounter = Callable[[str, bool], int]   # (text, chat) -> tokens as the server counts

# The last-resort tokenizer, for output when a server sends no usage and has no /tokenize:
# words, numbers and single punctuation marks (a little below what BPE tokenizers count).
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def regex_token_count(text: str) -> int:
    """Estimated tokens of `text` without the server's tokenizer."""
    return len(_TOKEN_RE.findall(text))


@dataclass
class WorkloadSpec:
    """The knobs users set (CLI flags, locust.conf, the web UI form)."""

    input_len: int = 512
    output_len: int = 128
    dataset: str | None = None           # ShareGPT JSON or JSONL with "prompt"/"messages"
    soak_mix: bool = False               # the seed's three prompts
    input_len_range: float = 0.0         # +-fraction, uniform, like vLLM's random-range-ratio
    output_len_range: float = 0.0
    shared_prefix_len: int = 0           # tokens every prompt starts with (prefix caching)
    ignore_eos: bool = True
    seed: int = 0
    pool_size: int = 32                  # distinct calibrated prompts per process

    def validate(self, prefix: str = "--") -> None:
        """A UsageError naming the option (`prefix`: "--" for harness load, "--llm-" for the
        plugin's options under plain Locust) whose value cannot make a prompt."""
        for name in ("input_len", "output_len"):
            value = getattr(self, name)
            if value < 1:   # (0 and below used to be taken as they came)
                raise UsageError(f"{prefix}{name.replace('_', '-')} must be at least 1 token, not {value}")
        for name in ("input_len_range", "output_len_range"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UsageError(f"{prefix}{name.replace('_', '-')} is a fraction in [0, 1), "
                                 f"not {getattr(self, name):g}")
        if self.shared_prefix_len < 0:
            raise UsageError(f"{prefix}shared-prefix-len must be >= 0 tokens, not {self.shared_prefix_len}")
        if self.shared_prefix_len >= self.input_len and not self.dataset and not self.soak_mix:
            raise UsageError(f"{prefix}shared-prefix-len must be smaller than {prefix}input-len")
        if self.dataset and not pathlib.Path(self.dataset).is_file():
            raise UsageError(f"dataset {self.dataset!r} not found; give a ShareGPT JSON or a JSONL file")
        if self.dataset:
            load_dataset(self.dataset)   # parsed before any load: a bad line is named now


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def calibrate_text(count: TokenCounter, target: int, rng: random.Random, chat: bool,
                   prefix: str = "", max_iter: int = 24) -> tuple[str, int]:
    """Random words whose token count, as `count` measures it, is exactly `target`.

    Grows or shrinks the word list by the measured error, then fixes the last token
    or two by swapping short words; returns the closest text found.
    """
    words = [rng.choice(_WORDS) for _ in range(max(1, target))]
    best: tuple[int, str, int] | None = None
    n = max(1, target)
    for i in range(max_iter):
        text = (prefix + " " if prefix else "") + " ".join(words[:n])
        got = count(text, chat)
        err = got - target
        if best is None or abs(err) < best[0]:
            best = (abs(err), text, got)
        if err == 0:
            return text, got
        if abs(err) > 1 or i % 2 == 0:
            n = max(1, n - err)          # these words are at least one token each
            words.extend(rng.choice(_WORDS) for _ in range(n - len(words)))
        else:
            words[n - 1] = rng.choice(_WORDS)   # off by one: try a word that splits differently
    assert best is not None
    return best[1], best[2]


def load_dataset(path: str) -> list[dict]:
    """ShareGPT (`[{"conversations": [{"from": "human", "value": ...}, ...]}]`) or JSONL
    lines with `prompt` or `messages` (and optional `max_tokens`/`output_len`)."""
    p = pathlib.Path(path)
    try:
        raw = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"dataset {path!r} cannot be read ({e})") from None
    items: Iterable
    jsonl = p.suffix == ".jsonl"
    if jsonl:
        items = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as e:
                raise UsageError(f"dataset {path}:{n}: not a JSON line ({e.msg} at column "
                                 f"{getattr(e, 'colno', '?')})") from None
            if not isinstance(item, dict) or not _usable(item):
                raise UsageError(f"dataset {path}:{n}: expected an object with 'prompt' (a string), "
                                 f"'messages' (a list of chat messages) or ShareGPT 'conversations'")
            items.append(item)
    else:
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UsageError(f"dataset {path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                             f"see README, 'Datasets'") from None
    out = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        if "conversations" in item:   # ShareGPT: first human turn in, first gpt turn sets length
            conv = item["conversations"]
            human = next((c.get("value") for c in conv if c.get("from") in ("human", "user")), None)
            gpt = next((c.get("value") for c in conv if c.get("from") in ("gpt", "assistant")), None)
            if human:
                out.append({"messages": [{"role": "user", "content": human}], "reference": gpt})
        elif "messages" in item or "prompt" in item:
            out.append(item)
    if not out:
        raise UsageError(f"dataset {path!r} has no usable entries: expected ShareGPT "
                         f"'conversations' or JSONL lines with 'prompt' or 'messages'")
    return out


def _usable(item: dict) -> bool:
    """A JSONL entry the workload can send."""
    if "conversations" in item:
        return isinstance(item["conversations"], list)
    if "prompt" in item:
        return isinstance(item["prompt"], str)
    messages = item.get("messages")
    return isinstance(messages, list) and bool(messages) and all(isinstance(m, dict) for m in messages)


@dataclass
class Workload:
    """Hands out prompts; one per process, shared by that process's users."""

    spec: WorkloadSpec
    count: TokenCounter | None = None
    chat: bool = True
    stream: int = 0     # e.g. the Locust worker index: the same prompt pool, its own pick sequence
    _pool: list[Prompt] = field(default_factory=list)
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.spec.seed if not self.stream else f"{self.spec.seed}:{self.stream}")

    def _out_len(self) -> int:
        s = self.spec
        if s.output_len_range:
            lo = max(1, int(s.output_len * (1 - s.output_len_range)))
            hi = int(s.output_len * (1 + s.output_len_range))
            return self._rng.randint(lo, hi)
        return s.output_len

    def prepare(self) -> None:
        """Build the prompt pool (calibrating lengths against the server) before load starts."""
        s = self.spec
        rng = random.Random(s.seed)
        if s.soak_mix:
            self._pool = [Prompt(text=t) for t in SOAK_PROMPTS]
            return
        if s.dataset:
            for item in load_dataset(s.dataset):
                self._pool.append(Prompt(messages=item.get("messages"), text=item.get("prompt"),
                                         max_tokens=int(item.get("max_tokens") or item.get("output_len")
                                                        or s.output_len)))
            return
        prefix = ""
        if s.shared_prefix_len and self.count is not None:
            prefix, _ = calibrate_text(self.count, s.shared_prefix_len, rng, self.chat)
        for _ in range(s.pool_size):
            target = s.input_len
            if s.input_len_range:
                lo = max(1, int(target * (1 - s.input_len_range)))
                target = rng.randint(lo, int(target * (1 + s.input_len_range)))
            if self.count is None:   # no tokenizer at all: about one token per word
                self._pool.append(Prompt(text=(prefix + " " if prefix else "") + _words(rng, target)))
                continue
            text, got = calibrate_text(self.count, target, rng, self.chat, prefix)
            self._pool.append(Prompt(text=text, input_tokens=got))

    def next(self) -> Prompt:
        if not self._pool:
            self.prepare()
        base = self._pool[self._rng.randrange(len(self._pool))]
        max_tokens = base.max_tokens if self.spec.dataset else self._out_len()
        return Prompt(messages=base.messages, text=base.text, input_tokens=base.input_tokens,
                      max_tokens=max_tokens, ignore_eos=self.spec.ignore_eos and not self.spec.dataset)


def server_token_counter(conn_factory: Callable[[], object], model: str,
                         headers: dict[str, str] | None = None) -> TokenCounter | None:
    """A counter that asks the server's `/tokenize` (vLLM and the simulator have it), with
    `headers` (the API key) on every call.

    Returns None when the server has no such endpoint.
    """
    conn = conn_factory()
    headers = {"Content-Type": "application/json", **(headers or {})}

    def count(text: str, chat: bool) -> int:
        body = ({"model": model, "messages": [{"role": "user", "content": text}]} if chat
                else {"model": model, "prompt": text})
        status, _, payload = conn.request("POST", "/tokenize", json.dumps(body).encode(), headers)
        if status != 200:
            raise LookupError(f"/tokenize answered {status}")
        return int(json.loads(payload)["count"])

    try:
        count("probe", True)
    except (LookupError, OSError, ValueError, KeyError):
        return None
    except Exception:  # the client's own failures (connect/timeout): no counter
        return None
    return count
