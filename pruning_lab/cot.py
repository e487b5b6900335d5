"""Chain-of-thought pruning: which reasoning steps can go (chapter 05).

A chain of thought (CoT) is split into steps; each step gets a score; the lowest-scoring steps are removed
until a target share of the CoT's tokens is left; the question and the answer always stay. Scores:

- ``FirstTokenSurprisal`` (ASAP's fine stage): −log p of a step's *first* token given everything before it.
  An unsurprising opening ("So", "Let me check") marks a step the model saw coming.
- ``MeanSurprisal``: the step's mean token surprisal (TokenSkip-style token importance, per step).
- ``AnswerGain``: log p(answer | CoT) − log p(answer | CoT without the step) — what the step tells the model
  about the answer (the conditional-entropy-reduction view). Needs pruned contexts: batched, one forward per
  batch of candidates, never one per step.
- ``Position`` (later steps first) and ``Random``: baselines.
- ``asap``: the coarse anchor stage (steps whose numbers appear in a short direct solution are anchors, kept
  first) followed by the fine first-token-surprisal stage.

Scores that depend only on the unpruned prefix come from **one forward pass per trace** (``token_logprobs``),
with exact token spans per step from the tokenizer's character offsets.

Data: ``make_problems`` writes seeded multi-step arithmetic word problems with exact answers;
``synthetic_trace`` writes a verbose CoT for one, with every redundant step (restatement, re-check, detour)
labelled; ``load_jsonl`` reads a ``{"question", "answer"}`` JSONL (GSM8K's format) for users who have one,
optionally with labelled steps (``file_trace`` turns those into a ``Trace``), and refuses any line it cannot
read exactly.
"""

from __future__ import annotations

import json
import math
import operator
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ANSWER_PREFIX = "The answer is"

# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    steps: tuple[str, ...] = ()  # the necessary steps, one computed value each (generator only)
    trace_steps: tuple[str, ...] = ()  # the step texts of a worked trace a problem file gave (load_jsonl)
    redundant: tuple[bool, ...] | None = None  # their labels (True = redundant), one per step; None: unlabelled


_NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "shells")


def make_problems(n: int, *, seed: int = 0, steps: tuple[int, int] = (2, 3)) -> list[Problem]:
    """``n`` seeded word problems of ``steps[0]``–``steps[1]`` operations (add, subtract, multiply) on small
    numbers, with exact integer answers and the necessary steps written out."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1.")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        value = rng.randint(3, 20)
        sentences = [f"{name} has {value} {item}."]
        work = []
        for _ in range(rng.randint(*steps)):
            op = rng.choice(["buy", "give", "double"] if value < 40 else ["give", "buy"])
            if op == "buy":
                k = rng.randint(2, 15)
                sentences.append(f"Then {name} buys {k} more.")
                work.append(f"{value} + {k} = {value + k}")
                value += k
            elif op == "give" and value > 3:
                k = rng.randint(1, value - 1)
                sentences.append(f"Then {name} gives away {k}.")
                work.append(f"{value} - {k} = {value - k}")
                value -= k
            else:
                sentences.append(f"Then the number of {item} doubles.")
                work.append(f"{value} * 2 = {value * 2}")
                value *= 2
        question = " ".join(sentences) + f" How many {item} does {name} have now?"
        out.append(Problem(question, value, tuple(work)))
    return out


_INTEGER = re.compile(r"[+-]?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)\.?")
_LABELS = {"necessary": False, "redundant": True}


def _exact_int(value, where: str) -> int:
    """``value`` as an integer when it is exactly one: an int (not a bool) as is; a string by the text after
    its last ``####`` (GSM8K's final line), which must be one integer (optional sign, thousands separators
    such as ``1,234``, an optional final period, surrounding whitespace). Anything else ("half of 5", "3.5",
    "5 or 6", a bool, a float, None) raises ValueError naming ``where``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        tail = value.rsplit("####", 1)[-1].strip()
        if _INTEGER.fullmatch(tail):
            return int(tail.rstrip(".").replace(",", ""))
        shown = repr(tail if "####" in value else value)
    else:
        shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise ValueError(f"{where}: the answer {shown} is not exactly one integer "
                     f"(write it as a number, e.g. \"#### 42\").")


def _file_steps(row: dict, where: str, require_labels: bool) -> tuple[tuple[str, ...], tuple[bool, ...] | None]:
    """The step texts and labels of one problem-file row (see ``load_jsonl``), checked."""
    steps, labels, flags = row.get("steps"), row.get("labels"), row.get("redundant")
    if labels is not None and flags is not None:
        raise ValueError(f'{where}: give the labels once, as "labels" or as "redundant", not both.')
    given = "labels" if labels is not None else "redundant" if flags is not None else None
    if steps is None:
        if given:
            raise ValueError(f'{where}: "{given}" without "steps": labels need the step texts they label.')
        if require_labels:
            raise ValueError(f'{where}: no labelled steps ("steps" with "labels" or "redundant"), and labels '
                             "are required here.")
        return (), None
    if not isinstance(steps, list) or len(steps) < 2:
        raise ValueError(f'{where}: "steps" must be a list of at least two step texts.')
    for k, text in enumerate(steps, 1):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f'{where}: step {k} of "steps" is not a non-empty string.')
        if re.search(SEGMENTERS["paragraph"], text.strip()):
            raise ValueError(f"{where}: step {k} holds a blank line, but blank lines separate steps; "
                             "split it into two steps or remove the blank line.")
    if given is None:
        if require_labels:
            raise ValueError(f'{where}: "steps" without labels ("labels": "necessary"/"redundant" per step, '
                             'or "redundant": true/false per step), and labels are required here.')
        return tuple(steps), None
    values = labels if given == "labels" else flags
    if not isinstance(values, list):
        raise ValueError(f'{where}: "{given}" must be a list, one entry per step.')
    if len(values) != len(steps):
        raise ValueError(f'{where}: {len(values)} "{given}" for {len(steps)} "steps": give one label per step.')
    if given == "labels":
        bad = [v for v in values if not (isinstance(v, str) and v in _LABELS)]
        if bad:
            raise ValueError(f'{where}: "labels" holds {bad[0]!r}: each label must be "necessary" or "redundant".')
        return tuple(steps), tuple(_LABELS[v] for v in values)
    bad = [v for v in values if not isinstance(v, bool)]
    if bad:
        raise ValueError(f'{where}: "redundant" holds {bad[0]!r}: each entry must be true or false.')
    return tuple(steps), tuple(values)


def load_jsonl(path: str | Path, *, require_labels: bool = False) -> list[Problem]:
    """Problems from a JSONL file, one JSON object a line (blank lines are ignored)::

        {"question": "...", "answer": "... #### 42"}                       # GSM8K's format; or "answer": 42
        {"question": "...", "answer": 42, "steps": ["...", "..."], "labels": ["necessary", "redundant"]}
        {"question": "...", "answer": 42, "steps": ["...", "..."], "redundant": [false, true]}

    The answer must be exactly one integer: an int, or a string whose text after its last ``####`` is one
    integer (``1,234`` and a final period allowed); "half of 5", "3.5" or "5 or 6" are refused, not guessed.
    ``steps`` (optional) are the texts of a worked trace, at least two, none holding a blank line; labels, one
    per step, come as ``labels`` ("necessary"/"redundant") or ``redundant`` (booleans) and need ``steps``.
    They fill ``Problem.trace_steps`` and ``Problem.redundant``; ``file_trace`` turns them into a ``Trace``.
    With ``require_labels`` every line must carry labelled steps.

    Nothing is skipped: the first line that breaks these rules raises ValueError naming ``file:line``; a
    missing file raises FileNotFoundError, a file without any problem ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such problem file (JSONL, one {{\"question\", \"answer\"}} a line).")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}).") from None
    problems = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg} at column {e.colno}).") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: not a JSON object (each line: {{\"question\": ..., \"answer\": ...}}).")
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise ValueError(f'{where}: no "question" string (each line: {{"question": ..., "answer": ...}}).')
        if "answer" not in row:
            raise ValueError(f'{where}: no "answer" (each line: {{"question": ..., "answer": ...}}).')
        answer = _exact_int(row["answer"], where)
        steps, redundant = _file_steps(row, where, require_labels)
        problems.append(Problem(row["question"], answer, trace_steps=steps, redundant=redundant))
    if not problems:
        raise ValueError(f"{path} holds no usable problem (each line: {{\"question\": ..., \"answer\": ...}}).")
    return problems


# --------------------------------------------------------------------------- traces


@dataclass
class Trace:
    """A question, a chain of thought (``cot``) and the final answer. ``redundant`` labels the steps of a
    synthetic trace (split by blank lines); it is ``None`` for the model's own traces."""

    question: str
    cot: str
    answer: int
    redundant: list[bool] | None = None
    kinds: list[str] | None = None


def synthetic_trace(problem: Problem, seed: int = 0, *, redundancy: float = 0.5) -> Trace:
    """A verbose CoT for a generated ``problem``: its necessary steps, each followed with probability
    ``redundancy`` by one labelled redundant step (a restatement of the question, a re-check of a value
    already computed, or a detour that computes something never used). Steps are separated by blank lines."""
    if not problem.steps:
        raise ValueError("synthetic_trace needs a generated problem (make_problems), whose steps are known.")
    rng = random.Random(seed)
    steps, labels, kinds = [], [], []

    def add(text, red, kind):
        steps.append(text), labels.append(red), kinds.append(kind)

    add("We need to find how many are left at the end.", True, "restatement")
    for k, work in enumerate(problem.steps, 1):
        left, result = work.split(" = ")
        add(f"Step {k}: {work}.", False, "necessary")
        if rng.random() < redundancy:
            kind = rng.choice(["check", "detour", "restatement"])
            if kind == "check":
                add(f"Let me double-check: {left} is indeed {result}.", True, kind)
            elif kind == "detour":
                a = int(left.split()[0])
                add(f"As an aside, {a} + 10 = {a + 10}, but we do not need that.", True, kind)
            else:
                add(f"So far we have {result}, and the question has not changed.", True, kind)
    return Trace(problem.question, "\n\n".join(steps), problem.answer, labels, kinds)


def file_trace(problem: Problem) -> Trace:
    """The trace a problem file gave (``load_jsonl`` with ``steps``): its steps joined by blank lines, the
    problem's answer, and its labels (``redundant``; None when the file gave steps without labels)."""
    if not problem.trace_steps:
        raise ValueError("file_trace needs a problem whose file gave its steps (load_jsonl with \"steps\" "
                         "and \"labels\" on the line); for a generated problem use synthetic_trace.")
    redundant = None if problem.redundant is None else list(problem.redundant)
    return Trace(problem.question, "\n\n".join(problem.trace_steps), problem.answer, redundant)


def chat_prompt(tokenizer, question: str, instruction: str = "Solve step by step, then give the answer.") -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": f"{question} {instruction}"}], tokenize=False,
                                         add_generation_prompt=True)


def parse_answer(text: str) -> int | None:
    """The first integer after "The answer is", else the last integer in the text."""
    tail = text.split(ANSWER_PREFIX, 1)[1] if ANSWER_PREFIX in text else text
    nums = re.findall(r"-?\d+", tail.replace(",", ""))
    if not nums:
        return None
    return int(nums[0] if ANSWER_PREFIX in text else nums[-1])


@torch.inference_mode()
def model_traces(model: nn.Module, tokenizer, problems: list[Problem], *, max_new_tokens: int = 128,
                 batch_size: int = 8) -> list[Trace]:
    """The model's own greedy step-by-step answers (left-padded batches); the CoT is the generated text
    before "The answer is" (the whole text when the model never says it)."""
    traces = []
    device = next(model.parameters()).device
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        enc = _left_pad(tokenizer, [chat_prompt(tokenizer, p.question) for p in chunk]).to(device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        for p, ids in zip(chunk, out[:, enc.input_ids.shape[1]:]):
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            traces.append(Trace(p.question, text.split(ANSWER_PREFIX)[0].strip(), p.answer))
    return traces


from .data import left_padded as _left_pad  # noqa: E402  (one left-padding helper for chapters 4 and 5)


# --------------------------------------------------------------------------- segmentation

SEGMENTERS = {
    "paragraph": r"\n\s*\n",  # ASAP: steps are paragraphs separated by blank lines
    "line": r"\n",
    "sentence": r"(?<=[.!?])\s+",
    "step": r"(?=\bStep \d+\s*[:.])",
}


def segment(text: str, how: str = "paragraph") -> list[tuple[int, int]]:
    """Character spans of the steps of ``text``: consecutive, covering every character (separators go to the
    step before them), so ``"".join(text[a:b] for a, b in spans) == text``. Raises on empty text or when
    there are fewer than two steps."""
    if how not in SEGMENTERS:
        raise ValueError(f"Unknown segmentation {how!r}: choose one of {sorted(SEGMENTERS)}.")
    if not text.strip():
        raise ValueError("The trace is empty: there is nothing to segment or prune.")
    cuts = [m.end() if how != "step" else m.start() for m in re.finditer(SEGMENTERS[how], text)]
    bounds = sorted({0, len(text), *[c for c in cuts if 0 < c < len(text)]})
    spans = [(a, b) for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]
    # glue any whitespace-only pieces to their neighbours so the spans still cover the text
    spans = [(spans[0][0] if i == 0 else a, spans[i + 1][0] if i + 1 < len(spans) else len(text))
             for i, (a, b) in enumerate(spans)]
    if spans:
        spans[0] = (0, spans[0][1])
    if len(spans) < 2:
        raise ValueError(f"The trace has {len(spans)} step(s) by {how!r} segmentation: pruning needs at least two. "
                         "Try another segmentation (line, sentence, step).")
    return spans


def token_spans(offsets: torch.Tensor, char_spans: list[tuple[int, int]], start: int) -> list[tuple[int, int]]:
    """Token index ranges [a, b) of character spans (relative to ``start``, the CoT's first character in
    the encoded text), from the tokenizer's ``offset_mapping``: a token belongs to the step holding the first
    non-space character it covers."""
    ends = offsets[:, 1].contiguous()
    bounds = torch.tensor([[start + a, start + b] for a, b in char_spans])
    idx = torch.searchsorted(ends, bounds, right=True)  # first token ending after each boundary
    return [(int(lo), int(hi)) for lo, hi in idx]


# --------------------------------------------------------------------------- one forward per trace


@dataclass
class Encoded:
    """A trace encoded once: ids of prompt + CoT + answer, the steps' token spans, the answer's span."""

    trace: Trace
    ids: torch.Tensor  # (T,)
    steps: list[tuple[int, int]]  # token spans of the CoT's steps
    char_steps: list[tuple[int, int]]  # character spans in trace.cot
    answer: tuple[int, int]  # token span of the answer's number
    prompt_len: int


def encode(tokenizer, trace: Trace, how: str = "paragraph") -> Encoded:
    """Tokenise ``chat prompt + CoT + "\\n\\nThe answer is N."`` once, with exact step spans from offsets."""
    prompt = chat_prompt(tokenizer, trace.question)
    char_steps = segment(trace.cot, how)
    tail = f"\n\n{ANSWER_PREFIX} {trace.answer}."
    text = prompt + trace.cot + tail
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.offset_mapping[0]
    steps = token_spans(offsets, char_steps, len(prompt))
    a0 = len(prompt) + len(trace.cot) + len(f"\n\n{ANSWER_PREFIX}")
    answer = token_spans(offsets, [(0, len(f" {trace.answer}"))], a0)[0]
    return Encoded(trace, enc.input_ids[0], steps, char_steps, answer, steps[0][0])


def _right_padded(seqs: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of 1-D id sequences right-padded into one batch."""
    n = max(len(x) for x in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, :len(x)], mask[r, :len(x)] = x, 1
    return ids.to(device), mask.to(device)


def _next_token_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
                         cols: torch.Tensor) -> torch.Tensor:
    """log p(ids[rows, cols + 1] | ids[rows, :cols + 1]) from one forward of the batch: for a Llama-style
    ``model.model`` + ``lm_head`` (logits exactly ``lm_head(hidden)``) the output layer runs on those positions
    only, not on the whole batch × vocabulary; other models take their full logits. log p = logit −
    logsumexp(logits), without materialising a log-softmax."""
    base, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if (base is not None and hasattr(base, "layers") and isinstance(head, nn.Linear)
            and getattr(model.config, "final_logit_softcapping", None) is None
            and getattr(model.config, "logit_scale", None) is None):
        logits = head(base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[rows, cols])
    else:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, cols]
    logits = logits.float()
    return logits.gather(-1, ids[rows, cols + 1][:, None])[:, 0] - torch.logsumexp(logits, -1)


@torch.inference_mode()
def token_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """log p(token t | tokens < t) for t ≥ 1 of one sequence, from one forward: (T,), entry 0 is 0."""
    return token_logprobs_batch(model, [ids])[0]


@torch.inference_mode()
def token_logprobs_batch(model: nn.Module, seqs: list[torch.Tensor], batch_size: int = 8) -> list[torch.Tensor]:
    """``token_logprobs`` of many sequences: sorted by length and right-padded into batches (little
    padding), one forward per batch, the output layer applied only where the next token is real (for a
    Llama-style ``model.model`` + ``lm_head``; other models: all positions), and
    log p = logit − logsumexp(logits) without materialising the full log-softmax."""
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        chunk = [seqs[j] for j in rows]
        ids, mask = _right_padded(chunk, device)
        nxt = mask[:, 1:].bool()  # positions whose next token is real
        lp = torch.zeros(nxt.shape, device=device)
        lp[nxt] = _next_token_logprobs(model, ids, mask, *nxt.nonzero(as_tuple=True))
        lp = lp.cpu()
        for r, (j, x) in enumerate(zip(rows, chunk)):
            out[j] = torch.cat([lp.new_zeros(1), lp[r, :len(x) - 1]])
    return out


# --------------------------------------------------------------------------- step scores (higher = keep)


@dataclass(frozen=True)
class FirstTokenSurprisal:
    """ASAP's fine stage: −log p(first token of the step | all before it)."""

    name = "first_token_surprisal"

    def score(self, enc: Encoded, logp: torch.Tensor, **_) -> torch.Tensor:
        firsts = torch.tensor([a for a, _ in enc.steps])
        return -logp[firsts]


@dataclass(frozen=True)
class MeanSurprisal:
    """Mean −log p over the step's tokens."""

    name = "mean_surprisal"

    def score(self, enc: Encoded, logp: torch.Tensor, **_) -> torch.Tensor:
        seg = torch.repeat_interleave(torch.arange(len(enc.steps)), torch.tensor([b - a for a, b in enc.steps]))
        tok = torch.cat([torch.arange(a, b) for a, b in enc.steps])
        sums = torch.zeros(len(enc.steps)).index_add_(0, seg, -logp[tok])
        return sums / torch.tensor([max(b - a, 1) for a, b in enc.steps], dtype=torch.float)


@dataclass(frozen=True)
class Position:
    """Later steps first (the answer is usually computed last)."""

    name = "position"

    def score(self, enc: Encoded, logp: torch.Tensor, **_) -> torch.Tensor:
        return torch.arange(len(enc.steps), dtype=torch.float)


@dataclass(frozen=True)
class Random:
    name = "random"
    seed: int = 0

    def score(self, enc: Encoded, logp: torch.Tensor, **_) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + len(enc.ids))
        return torch.rand(len(enc.steps), generator=g)


@dataclass(frozen=True)
class AnswerGain:
    """log p(answer | CoT) − log p(answer | CoT without the step), all steps' variants in batched forwards."""

    name = "answer_gain"
    batch_size: int = 16

    def score(self, enc: Encoded, logp: torch.Tensor, *, model=None, **_) -> torch.Tensor:
        if model is None:
            raise ValueError("AnswerGain needs the model: score(..., model=model).")
        full = float(logp[enc.answer[0]:enc.answer[1]].sum())
        variants = [keep_ids(enc, [j for j in range(len(enc.steps)) if j != i]) for i in range(len(enc.steps))]
        without = answer_logprob_batch(model, variants, self.batch_size)
        return full - torch.tensor(without)


def keep_ids(enc: Encoded, keep: list[int]) -> tuple[torch.Tensor, int, int]:
    """Ids of prompt + the kept steps (in order) + the answer tail; where the answer starts; its length."""
    parts = [enc.ids[:enc.prompt_len]] + [enc.ids[a:b] for i, (a, b) in enumerate(enc.steps) if i in set(keep)]
    parts.append(enc.ids[enc.steps[-1][1]:])
    ids = torch.cat(parts)
    return ids, len(ids) - (len(enc.ids) - enc.answer[0]), enc.answer[1] - enc.answer[0]


@torch.inference_mode()
def answer_logprob_batch(model: nn.Module, variants: list[tuple], batch_size: int = 16) -> list[float]:
    """log p(answer tokens) for many (ids, answer_start, answer_len) variants, right-padded in batches."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(variants), batch_size):
        chunk = variants[i:i + batch_size]
        ids, mask = _right_padded([v for v, _, _ in chunk], device)
        # the answer's tokens only: position a-1+j predicts answer token j (rows and columns of the batch)
        rows = torch.cat([torch.full((k,), r) for r, (_, _, k) in enumerate(chunk)])
        cols = torch.cat([torch.arange(a - 1, a - 1 + k) for _, a, k in chunk])
        lp = _next_token_logprobs(model, ids, mask, rows.to(device), cols.to(device))
        out += torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, rows, lp.double().cpu()).tolist()
    return out


SCORES = {s.name: s for s in (FirstTokenSurprisal, MeanSurprisal, AnswerGain, Position, Random)}


def get_score(score):
    if isinstance(score, str):
        if score == "asap":
            return "asap"
        if score not in SCORES:
            raise ValueError(f"Unknown step score {score!r}: choose one of {sorted(SCORES) + ['asap']}.")
        return SCORES[score]()
    return score


def anchors(enc: Encoded, direct: str) -> torch.Tensor:
    """ASAP's coarse stage, simplified: a step is an anchor when a number it states also appears in a short
    direct solution (``direct``: e.g. the model's concise answer, or the necessary equations)."""
    wanted = set(re.findall(r"\d+", direct))
    cot = enc.trace.cot
    return torch.tensor([bool(set(re.findall(r"\d+", cot[a:b])) & wanted) for a, b in enc.char_steps])


def score_steps(model: nn.Module, enc: Encoded, score, *, direct: str | None = None, logp=None) -> torch.Tensor:
    """Scores of every step of one encoded trace (higher = keep). ``asap``: anchors (from ``direct``) rank
    above every other step; within each group, first-token surprisal. Pass ``logp`` (from
    ``token_logprobs_batch`` over many traces) to reuse one forward for every prefix-only score."""
    logp = token_logprobs(model, enc.ids) if logp is None else logp
    s = get_score(score)
    if s == "asap":
        fine = FirstTokenSurprisal().score(enc, logp)
        if direct is None:
            return fine
        return fine + 1e4 * anchors(enc, direct).float()
    return s.score(enc, logp, model=model)


# --------------------------------------------------------------------------- pruning and evaluation


def prune(enc: Encoded, scores: torch.Tensor, keep_fraction: float | None = None, *,
          threshold: float | None = None) -> list[int]:
    """Indices of the steps to keep: the highest-scoring steps whose tokens fit in ``keep_fraction`` of the CoT's
    tokens (greedy in score order, skipping a step that would overflow), or every step scoring ≥ ``threshold``.
    Question and answer are never part of the CoT, so they always stay."""
    if (keep_fraction is None) == (threshold is None):
        raise ValueError("Give exactly one of keep_fraction (a share of the CoT's tokens) or threshold.")
    if threshold is not None:
        return [i for i in range(len(enc.steps)) if float(scores[i]) >= threshold]
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction={keep_fraction} must be in (0, 1].")
    sizes = [b - a for a, b in enc.steps]
    limit = keep_fraction * sum(sizes)
    kept, used = [], 0
    for i in torch.argsort(scores, descending=True, stable=True).tolist():
        if used + sizes[i] <= limit + 1e-9:
            kept.append(i)
            used += sizes[i]
    return sorted(kept)


def pruned_cot(enc: Encoded, keep: list[int]) -> str:
    return "".join(enc.trace.cot[a:b] for i, (a, b) in enumerate(enc.char_steps) if i in set(keep)).strip()


def precision_recall(trace: Trace, keep: list[int]) -> tuple[float, float]:
    """On a labelled trace: precision = share of removed steps that were redundant; recall = share of the
    redundant steps that were removed. The steps are ``trace.cot``'s paragraphs (blank-line segmentation, as
    ``synthetic_trace`` and ``file_trace`` write them), one label each; ``keep`` indexes them."""
    if trace.redundant is None:
        raise ValueError("precision_recall needs a labelled trace (its redundant is None): use synthetic_trace, "
                         "or file_trace on a problem file with labelled steps.")
    n = len(segment(trace.cot, "paragraph"))
    if len(trace.redundant) != n:
        raise ValueError(f"The trace has {len(trace.redundant)} label(s) for {n} step(s) (its cot split by blank "
                         "lines): give one label per step.")
    kept = set()
    for i in keep:
        if isinstance(i, bool) or not hasattr(i, "__index__") or not 0 <= operator.index(i) < n:
            raise ValueError(f"keep holds {i!r}, not a step index of this trace (0 to {n - 1}).")
        kept.add(operator.index(i))
    removed = [i for i in range(n) if i not in kept]
    red = [i for i, r in enumerate(trace.redundant) if r]
    hit = len(set(removed) & set(red))
    return (hit / len(removed) if removed else 1.0), (hit / len(red) if red else 1.0)


@torch.inference_mode()
def greedy_answers(model: nn.Module, tokenizer, prompts: list[str], *, max_new_tokens: int = 8,
                   batch_size: int = 16) -> list[int | None]:
    """Greedy continuation of each prompt (which should end with "The answer is"), parsed to an integer."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = _left_pad(tokenizer, prompts[i:i + batch_size]).to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for ids in gen[:, enc.input_ids.shape[1]:]:
            out.append(parse_answer(tokenizer.decode(ids, skip_special_tokens=True)))
    return out


def answer_prompt(tokenizer, trace: Trace, cot: str) -> str:
    return chat_prompt(tokenizer, trace.question) + (cot + "\n\n" if cot else "") + ANSWER_PREFIX


# --------------------------------------------------------------------------- think shorter: LoRA on pruned traces


def finetune_lora(model: nn.Module, tokenizer, examples: list[tuple[str, str]], *, steps: int = 30, lr: float = 5e-4,
                  rank: int = 8, batch_size: int = 4, seed: int = 0, progress: bool = False) -> nn.Module:
    """Supervised LoRA (peft, on q/k/v/o projections) on (prompt, completion) pairs, loss on the completion's
    tokens only; merged back into ``model`` and returned (in eval mode)."""
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    if not examples:
        raise ValueError("finetune_lora needs at least one (prompt, completion) example.")
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    peft_model.train()
    for _ in tqdm(range(steps), desc="LoRA", disable=not progress):
        batch = rng.sample(examples, min(batch_size, len(examples)))
        texts = [p + c for p, c in batch]
        enc = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True).to(device)
        labels = enc.input_ids.clone()
        labels[enc.attention_mask == 0] = -100
        for r, (p, _) in enumerate(batch):
            labels[r, :len(tokenizer(p, add_special_tokens=False).input_ids)] = -100
        loss = peft_model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    merged = peft_model.merge_and_unload()
    return merged.eval()


# --------------------------------------------------------------------------- parallel traces with early agreement


def stop_rule(tentative: list[int | None], active: list[bool], min_group: int = 2) -> list[bool]:
    """DeepPrune's idea without a trained judge: an active trace whose tentative answer already has at least
    ``min_group`` *other* traces agreeing (stopped or running) is redundant and stops. Only one trace per
    answer group goes on, so the group's answer keeps a representative. Returns the new ``active`` flags."""
    new = list(active)
    groups: dict[int, list[int]] = {}
    for i, ans in enumerate(tentative):
        if ans is not None:
            groups.setdefault(ans, []).append(i)
    for members in groups.values():
        if len(members) > min_group:  # each member has at least min_group others agreeing
            for i in [i for i in members if new[i]][1:]:  # the first running member goes on
                new[i] = False
    return new


@torch.inference_mode()
def parallel_traces(model: nn.Module, tokenizer, problem: Problem, *, n: int = 8, max_new_tokens: int = 96,
                    chunk: int = 16, temperature: float = 0.8, min_group: int = 2, prune: bool = True,
                    seed: int = 0) -> dict:
    """Sample ``n`` traces in one batch, ``chunk`` tokens at a time; after each chunk read every running trace's
    tentative answer by forcing "The answer is" (one batched greedy step of a few tokens), and with ``prune``
    stop the traces ``stop_rule`` finds redundant. Returns the majority answer, whether it is right, and the
    tokens spent (sampled tokens, plus the probes' tokens)."""
    from collections import Counter

    device = next(model.parameters()).device
    torch.manual_seed(seed)
    prompt = chat_prompt(tokenizer, problem.question)
    cur = tokenizer([prompt] * n, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    rows = list(range(n))  # which trace each row of ``cur`` is
    active, finished = [True] * n, [False] * n
    tentative: list[int | None] = [None] * n
    spent = probe_tokens = 0
    texts = [""] * n
    eos = tokenizer.eos_token_id
    for _ in range(0, max_new_tokens, chunk):
        if not rows:
            break
        out = model.generate(cur, attention_mask=torch.ones_like(cur), max_new_tokens=chunk, do_sample=True,
                             temperature=temperature, top_p=1.0, pad_token_id=eos)
        new = out[:, cur.shape[1]:]
        for r, i in enumerate(rows):
            toks = new[r].tolist()
            done = eos in toks
            toks = toks[:toks.index(eos) + 1] if done else toks
            spent += len(toks)
            texts[i] += tokenizer.decode(toks, skip_special_tokens=True)
            finished[i] = finished[i] or done or ANSWER_PREFIX in texts[i]
        probes = [prompt + texts[i].split(ANSWER_PREFIX)[0].rstrip() + "\n\n" + ANSWER_PREFIX for i in rows]
        for i, a in zip(rows, greedy_answers(model, tokenizer, probes, max_new_tokens=4)):
            tentative[i] = a
        probe_tokens += 4 * len(rows)
        if prune:
            active = stop_rule(tentative, active, min_group)
        keep = [r for r, i in enumerate(rows) if active[i] and not finished[i] and new.shape[1] == chunk]
        cur, rows = out[keep], [rows[r] for r in keep]
    votes = Counter(a for a in tentative if a is not None)
    majority = votes.most_common(1)[0][0] if votes else None
    return {"answer": majority, "correct": majority == problem.answer, "tokens": spent,
            "probe_tokens": probe_tokens, "tentative": tentative}


# --------------------------------------------------------------------------- notebook helpers


def answer_logprobs(model: nn.Module, tokenizer, prompts_answers: list[tuple[str, int]], batch_size: int = 16) -> list[float]:
    """Teacher-forced log p(" <answer>") after each prompt (which ends with "The answer is"), batched."""
    variants = []
    for prompt, ans in prompts_answers:
        ids = tokenizer(prompt + f" {ans}", add_special_tokens=False, return_tensors="pt").input_ids[0]
        n = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        variants.append((ids, n, len(ids) - n))
    return answer_logprob_batch(model, variants, batch_size)


def own_cot_stats(model: nn.Module, tokenizer, problems: list[Problem], *, max_new_tokens: int = 128) -> dict:
    """The model's own greedy CoTs on ``problems``: mean length in tokens, accuracy, per-problem correctness."""
    traces = model_traces(model, tokenizer, problems, max_new_tokens=max_new_tokens)
    answers = greedy_answers(model, tokenizer, [answer_prompt(tokenizer, t, t.cot) for t in traces])
    correct = [a == p.answer for a, p in zip(answers, problems)]
    lengths = [len(tokenizer(t.cot, add_special_tokens=False).input_ids) for t in traces]
    return {"mean_cot_tokens": sum(lengths) / len(lengths), "accuracy": sum(correct) / len(correct),
            "correct": correct, "answers": answers, "traces": traces}


def render_html(trace: Trace, values, title: str, keep: list[int] | None = None, how: str = "paragraph") -> str:
    """HTML of a trace with each step's background coloured by ``values`` in [0, 1] (red → green); steps not in
    ``keep`` are struck through. For notebooks: ``IPython.display.HTML(render_html(...))``."""
    import html

    from matplotlib import colormaps

    cmap = colormaps["RdYlGn"]
    parts = [f"<b>{html.escape(title)}</b><br><i>{html.escape(trace.question)}</i><br>"]
    for i, ((a, b), v) in enumerate(zip(segment(trace.cot, how), values)):
        r, g, bl, _ = cmap(float(v))
        text = html.escape(trace.cot[a:b].strip())
        if keep is not None and i not in set(keep):
            text = f"<s>{text}</s>"
        parts.append(f"<span style='background: rgba({int(255 * r)},{int(255 * g)},{int(255 * bl)},0.45); "
                     f"padding: 1px 3px'>{text}</span><br>")
    parts.append(f"<b>{ANSWER_PREFIX} {trace.answer}.</b>")
    return ("<div style='font-family: sans-serif; font-size: 13px; line-height: 1.6'>" + "".join(parts) + "</div>")
