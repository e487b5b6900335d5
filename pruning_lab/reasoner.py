"""A small reasoner: SmolLM2-135M taught to think out loud on one family of word problems (chapters 4, 5).

The embedded SmolLM2-135M-Instruct solves almost none of the chapter's arithmetic word problems, with or without a
chain of thought (CoT). CoT pruning needs a model whose CoTs *work*, so this module makes one: LoRA on verbose
step-by-step traces of the problem family, written the way a large reasoning model writes (restating the question,
re-checking values, trying detours, summing up), cached like the lottery levels.

The API a notebook uses (chapter 4 reuses it)::

    from pruning_lab import reasoner as rs
    model, tok = rs.load_reasoner(rs.CLASSROOM)          # from the repo's seed (trained once: 44 min on 2 cores)
    problems = rs.make_problems(50, split="heldout")      # never seen in training (disjoint by construction)
    text = rs.prompt(tok, problems[0])                    # the chat prompt ("verbose" style)
    outs = rs.solve(model, tok, problems)                 # greedy CoTs, parsed answers, correctness, tokens
    rs.parse_final("... The answer is 42.")               # 42; anything not exactly "The answer is <int>" -> None

Problems: seeded multi-step stories ("Anna has 12 apples. Then Anna buys 7 more. ...") with exact integer answers;
each problem knows its chain of values v_0 … v_n and the equations that compute them. A problem belongs to the
held-out split when a hash of its content says so (one in ``HELDOUT_SHARE``), so the two splits never share a problem,
however many of each are drawn.

Traces (``verbose_trace``): paragraphs separated by blank lines, each labelled *necessary* (the first paragraph that
computes a value of the chain) or *redundant* (restatements, re-checks, detours, summaries). Both kinds draw their
openers ("So", "Now", "Step 3:", "Hmm,", ...) and their sentence templates from the same pools, and a re-check can be
word for word the computation it repeats: the label is in the context (was this value computed before? is this the
question's number?), not in the wording.

Training (``sft_lora``): supervised LoRA on (prompt, completion) pairs, loss on the completion only, the output layer
applied on the completion's positions only; checkpoints every ``save_every`` steps (adapter + AdamW state), resumable,
deterministic batches (example ``i`` of the stream is a function of the seed and ``i``).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._io import atomic_path, file_sha256, read_json, write_json
from .data import left_padded
from .llama import PROJECTIONS
from .lora import add_adapters, merge_adapters
from .models import embedded_model_folder, load_llm
from .runs import RunFolder, digest

ANSWER_PREFIX = "The answer is"
INSTRUCTIONS = {
    "verbose": "Think it through step by step, then end with \"The answer is N.\"",
    "direct": "Show briefly how to get this answer.",  # ASAP's "direct CoT": the question *and* its answer are given
    "answer": "Give only the answer.",
}
HELDOUT_SHARE = 5  # one problem in 5 (by content hash) is held out

# --------------------------------------------------------------------------- problems

_NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "shells")
_PRONOUN = {"Anna": "she", "Ben": "he", "Carla": "she", "David": "he", "Emma": "she", "Farid": "he", "Grace": "she",
            "Hugo": "he", "Ines": "she", "Jonas": "he"}
_SYMBOL = {"buy": "+", "give": "-", "double": "*"}


@dataclass(frozen=True)
class Family:
    """The problem family: how many operations, how large the numbers. ``steps`` and the ranges are inclusive."""

    steps: tuple[int, int] = (3, 4)
    start: tuple[int, int] = (5, 30)
    buy: tuple[int, int] = (2, 9)  # "buys k more"
    give: tuple[int, int] = (1, 9)  # "gives away k" (never all of them)
    double_below: int = 25  # "the number doubles" only while the value is below this

    def __post_init__(self):
        for name in ("steps", "start", "buy", "give"):
            lo, hi = getattr(self, name)
            if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
                raise ValueError(f"Family.{name}={getattr(self, name)!r} must be two integers 1 <= lo <= hi.")


@dataclass(frozen=True)
class Problem:
    """A word problem with an exact integer answer. Generated problems also know their chain: ``values`` v_0 … v_n,
    ``ops`` (kind, operand) and ``steps`` (the equations "a op b = c"). Problems read from a file may carry a labelled
    trace instead: ``trace_steps`` and ``redundant`` (one label per step)."""

    question: str
    answer: int
    steps: tuple[str, ...] = ()
    values: tuple[int, ...] = ()
    ops: tuple[tuple[str, int], ...] = ()
    name: str = ""
    item: str = ""
    trace_steps: tuple[str, ...] = ()
    redundant: tuple[bool, ...] | None = None


def _draw(rng: random.Random, family: Family) -> Problem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(*family.start)
    values, ops, sentences, steps = [value], [], [f"{name} has {value} {item}."], []
    for _ in range(rng.randint(*family.steps)):
        kinds = ["buy", "give"] + (["double"] if value < family.double_below else [])
        kind = rng.choice(kinds if value > 1 else ["buy"])
        if kind == "buy":
            k = rng.randint(*family.buy)
            sentences.append(f"Then {name} buys {k} more.")
            new = value + k
        elif kind == "give":
            k = rng.randint(min(family.give[0], value - 1), min(family.give[1], value - 1))
            sentences.append(f"Then {name} gives away {k}.")
            new = value - k
        else:
            k = 2
            sentences.append(f"Then the number of {item} doubles.")
            new = value * 2
        steps.append(f"{value} {_SYMBOL[kind]} {k} = {new}")
        ops.append((kind, k))
        values.append(new)
        value = new
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    return Problem(question, value, tuple(steps), tuple(values), tuple(ops), name, item)


def is_heldout(problem: Problem) -> bool:
    """Whether ``problem`` belongs to the held-out split (a hash of its question; one in ``HELDOUT_SHARE``)."""
    return int(hashlib.sha256(problem.question.encode()).hexdigest()[:8], 16) % HELDOUT_SHARE == 0


def make_problems(n: int, *, split: str = "train", seed: int = 0, family: Family = Family()) -> list[Problem]:
    """``n`` seeded problems of ``family`` from one split: ``"train"`` or ``"heldout"`` (disjoint by content hash,
    so no held-out problem is ever a training problem), or ``"any"`` (both, as drawn)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be an integer >= 1.")
    if split not in ("train", "heldout", "any"):
        raise ValueError(f"split={split!r}: choose 'train', 'heldout' or 'any'.")
    rng = random.Random(f"{split}:{seed}")
    out: list[Problem] = []
    while len(out) < n:
        p = _draw(rng, family)
        if split == "any" or is_heldout(p) == (split == "heldout"):
            out.append(p)
    return out


# --------------------------------------------------------------------------- prompts and answers


def prompt(tokenizer, problem: Problem | str, style: str = "verbose", *, answer: int | None = None) -> str:
    """The chat prompt for a problem. ``style``: ``"verbose"`` (think step by step), ``"answer"`` (the answer only;
    the assistant's turn then opens with "The answer is"), ``"direct"`` (a short solution of a question whose
    ``answer`` is given — ASAP's direct CoT)."""
    if style not in INSTRUCTIONS:
        raise ValueError(f"style={style!r}: choose one of {sorted(INSTRUCTIONS)}.")
    question = problem.question if isinstance(problem, Problem) else str(problem)
    if style == "direct":
        if answer is None:
            answer = problem.answer if isinstance(problem, Problem) else None
        if answer is None:
            raise ValueError("The direct style needs the answer (ASAP writes the direct CoT from question + answer).")
        question = f"{question} {ANSWER_PREFIX} {answer}."
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{question} {INSTRUCTIONS[style]}"}],
                                        tokenize=False, add_generation_prompt=True)
    return text + (ANSWER_PREFIX if style == "answer" else "")


_FINAL = re.compile(rf"{ANSWER_PREFIX}\s+(-?\d+)(?=\s*\.?\s*$|\s*\.\s)")


def parse_final(text: str) -> int | None:
    """The integer of the *last* "The answer is N" when the text ends there (an optional full stop, whitespace or
    an end-of-turn token after it); None for anything else ("The answer is half of 5", "... is 5 or 6", no answer).
    """
    text = text.replace("<|im_end|>", "").rstrip()
    matches = list(_FINAL.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    return int(m.group(1)) if not text[m.end():].strip(" .") else None


def is_correct(text: str, problem: Problem) -> bool:
    """The exact answer checker: the completion ends with "The answer is <the right integer>"."""
    return parse_final(text) == problem.answer


def split_cot(text: str) -> str:
    """The CoT of a completion: everything before its last "The answer is" (the whole text when it never says it)."""
    text = text.replace("<|im_end|>", "")
    i = text.rfind(ANSWER_PREFIX)
    return (text[:i] if i >= 0 else text).strip()


# --------------------------------------------------------------------------- traces


@dataclass
class Trace:
    """A question, a chain of thought (``cot``, paragraphs separated by blank lines) and the final answer.
    ``redundant`` labels the paragraphs (None when unknown); ``kinds`` names what each paragraph does."""

    question: str
    cot: str
    answer: int
    redundant: list[bool] | None = None
    kinds: list[str] | None = None


_OPENERS = ("", "", "So ", "Now ", "Okay, ", "Then ", "Next, ", "Hmm, ", "Wait, ", "Alright, ", "Right, ",
            "Actually, ", "No, wait, ", "Let me see. ", "STEP")  # "STEP" becomes "Step k: " (the paragraph's number)
_CORRECTIONS = ("Wait, ", "No, wait, ", "Actually, ", "Hmm, ", "Wait, ")  # after a detour


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _verb(kind: str, k: int, pron: str, item: str) -> str:
    return {"buy": f"{pron} buys {k} more", "give": f"{pron} gives away {k}",
            "double": f"the number of {item} doubles"}[kind]


def _equation(a: int, kind: str, k: int) -> tuple[str, int]:
    c = a + k if kind == "buy" else a - k if kind == "give" else a * 2
    return f"{a} {_SYMBOL[kind]} {k} = {c}", c


def _frame(rng: random.Random, a: int, kind: str, k: int, pron: str, item: str) -> str:
    """One sentence around the equation ``a op k = c``: the same frames serve necessary steps, re-checks and
    detours, so the wording does not tell them apart (some frames borrow the restatements' words)."""
    eq, c = _equation(a, kind, k)
    v = _verb(kind, k, pron, item)
    forms = (f"{v}, so {eq}.", f"{eq}, so {pron} has {c} {item}.", f"if {v}, then {eq}.", f"{pron} had {a}, and {v}: {eq}.",
             f"{eq}.", f"so far {pron} has {a}. Then {v}, which gives {eq}.", f"let me check: {eq}, because {v}.",
             f"we want the number of {item} at the end. Right now {pron} has {a}, and {v}: {eq}.",
             f"reading the question again, {v}. That is {eq}.")
    s = forms[rng.randrange(len(forms))]
    return s + rng.choice(("", "", "", " That seems right.", " Okay.", " Good."))


def _plan(problem: Problem, upto: int | None = None) -> str:
    """The chain (or its first ``upto`` operations) as one expression, e.g. ``(21 - 6) * 2``: the numbers and the
    operators, but no equation of the chain."""
    expr = str(problem.values[0])
    for j, (kind, k) in enumerate(problem.ops[:upto]):
        expr = f"{'(' + expr + ')' if j else expr} {_SYMBOL[kind]} {k}"
    return expr


def _restatement(rng: random.Random, problem: Problem, pron: str, upto: int | None = None) -> str:
    """A restatement of the question — whole (``upto`` None: ``(21 - 6) * 2 = ?``) or up to an operation
    (``21 - 6 = 15``) — in the same sentences either way, with its numbers and operators."""
    name, item, v0, plan = problem.name, problem.item, problem.values[0], _plan(problem, upto)
    what = f"{plan} = ?" if upto is None else f"{plan} = {problem.values[upto]}"
    n = len(problem.ops) if upto is None else upto
    stop = "" if upto is None else "."
    forms = (f"{name} starts with {v0} {item}, and then {n} thing{'s' * (n > 1)} happen{'s' * (n == 1)}: {what}{stop}",
             f"we want the number of {item} {name} has at the end. At the start {pron} has {v0}, so {what}{stop}",
             f"let me read this carefully. {name} has {v0} {item} at first, and that gives {what}{stop}",
             f"so the question reads {what}, starting from {v0} {item}.")
    return forms[rng.randrange(len(forms))]


def _ending(rng: random.Random, problem: Problem, eq: str) -> str:
    """The last computation in closing words (the same words close a CoT as its summary)."""
    name, item, answer = problem.name, problem.item, problem.answer
    return rng.choice([f"so at the end {name} has {answer} {item}, because {eq}.",
                       f"that means {eq}, and {name} has {answer} {item} at the end.",
                       f"so the last step is {eq}, and the whole thing is {_plan(problem)} = {answer}."])


def verbose_trace(problem: Problem, seed: int = 0, *, redundancy: float = 0.7) -> Trace:
    """A verbose CoT for a generated ``problem``, as a large reasoning model writes one: an opening restatement of
    the question (on its own, or as the start of the first computation); for each operation, sometimes a detour
    first (the same step with another number, then a correction), the computation, then (with probability
    ``redundancy``, up to twice) a re-check or a re-reading of the question so far; a closing summary. Paragraphs are
    separated by blank lines. Labels come from the chain (``chain_labels``): *necessary* = the first paragraph that
    writes an equation of the chain; everything else is *redundant*. Every paragraph draws its opener from one pool
    ("Step k:" included) and writes numbers and operators; computations, re-checks and detours share their sentence
    frames, and restatements write the chain as one expression (``(21 - 6) * 2``), so the wording does not give the
    labels away. ``TRACE_VERSION`` 3: a detour comes before the first computation half the time (a doubling takes
    none), so the opening paragraph, the one with the restatement, is redundant in over a third of the traces (36% of
    400 classroom traces), and every closing form writes the last equation before the answer (version 2: a detour
    first at 0.3, and one closing form wrote the answer before its equation; version 1: restatements in a paragraph
    of their own, with no operator)."""
    if not problem.ops:
        raise ValueError("verbose_trace needs a generated problem (make_problems), whose chain of values is known.")
    rng = random.Random(f"trace:{seed}:{problem.question}")
    pron, item = _PRONOUN.get(problem.name, "they"), problem.item
    paras: list[str] = []
    kinds: list[str] = []

    def add(text: str, kind: str, opener: str | None = None) -> None:
        if opener is None:
            opener = rng.choice(_OPENERS)
        opener = f"Step {len(paras) + 1}: " if opener == "STEP" else opener
        paras.append(_cap(opener) + (_cap(text) if opener.endswith((". ", ": ")) or not opener else text))
        kinds.append(kind)

    def frame(j: int, k: int, closing: bool = False) -> str:
        """An equation paragraph of operation ``j`` (computation, re-check or detour alike): the frame, sometimes
        in closing words (the last operation), sometimes opened by a re-reading of the question so far."""
        (kind, _), a = problem.ops[j], problem.values[j]
        if closing and rng.random() < 0.4:
            text = _ending(rng, problem, _equation(a, kind, k)[0])
        else:
            text = _frame(rng, a, kind, k, pron, item)
        if j > 0 and rng.random() < 0.25:  # opened by a re-reading of the question up to here
            text = _restatement(rng, problem, pron, upto=j) + " " + _cap(text)
        return text

    opening = [_restatement(rng, problem, pron)]  # opens the first paragraph: a paragraph that only restated would
    # write no equation, redundant by its wording alone

    def opened(text: str) -> str:
        """``text``, opened by the question's restatement when it is the first paragraph."""
        return opening.pop() + " " + _cap(text) if opening else text

    last = len(problem.ops) - 1
    for j, ((kind, k), a) in enumerate(zip(problem.ops, problem.values)):
        corrected = None
        if kind != "double" and rng.random() < (0.5 if j == 0 else 0.3):  # a detour: the step with another
            # number, then a correction; before the first computation half the time, so the opening paragraph (the
            # question's restatement) is often redundant and its words cannot stand for "necessary"
            lo, hi = (2, 9) if kind == "buy" else (1, max(1, min(9, a - 1)))
            others = [x for x in range(lo, hi + 1) if x != k]
            if others:
                add(opened(frame(j, rng.choice(others))), "detour")
                corrected = rng.choice(_CORRECTIONS) if rng.random() < 0.3 else None
        add(opened(frame(j, k, closing=j == last)), "computation", corrected)
        for _ in range(2):
            if rng.random() >= redundancy:
                break
            add(frame(j, k, closing=j == last), "check")
    if rng.random() < 0.5:  # a closing summary (or the CoT ends on its last computation or re-check)
        add(frame(last, problem.ops[-1][1], closing=True), "summary")
    trace = Trace(problem.question, "\n\n".join(p.rstrip() for p in paras), problem.answer, None, kinds)
    # the labels are the chain's, as for any CoT: the first paragraph that writes each equation of the chain
    trace.redundant = chain_labels(trace, problem)
    return trace


def direct_solution(problem: Problem) -> str:
    """A short solution, one equation per paragraph (what the "direct" style is trained to write)."""
    if not problem.ops:
        raise ValueError("direct_solution needs a generated problem (make_problems).")
    pron = _PRONOUN.get(problem.name, "they")
    return "\n\n".join(f"{_cap(_verb(kind, k, pron, problem.item))}: {_equation(a, kind, k)[0]}."
                       for (kind, k), a in zip(problem.ops, problem.values))


def completion(cot: str, answer: int) -> str:
    """What the assistant writes after the prompt: the CoT, a blank line, the answer, the end of the turn."""
    return (f"{cot}\n\n" if cot else "") + f"{ANSWER_PREFIX} {answer}.<|im_end|>"


_EQ = re.compile(r"(-?\d+)\s*([-+*])\s*(\d+)\s*=\s*(-?\d+)")


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


def chain_labels(trace: Trace, problem: Problem, spans: list[tuple[int, int]] | None = None) -> list[bool] | None:
    """Labels of any CoT of a generated ``problem`` (the reasoner's own included), derived from the problem's chain
    and never from a model: a step is *necessary* (False) when it is the first step that writes an equation of the
    chain ("a op k = c" with the problem's numbers), *redundant* (True) otherwise. ``spans``: the steps' character
    spans (default: paragraphs). None when some equation of the chain is never written (the trace cannot be graded).
    """
    if not problem.steps:
        raise ValueError("chain_labels needs a generated problem (make_problems), whose equations are known.")
    if spans is None:
        spans = segment(trace.cot, "paragraph")
    wanted: dict[tuple, list[int]] = {}  # an equation -> the chain positions it computes (a chain may repeat one)
    for i, s in enumerate(problem.steps):
        wanted.setdefault(tuple(s.replace("=", " ").split()), []).append(i)
    first: dict[int, int] = {}
    for j, (a, b) in enumerate(spans):
        for m in _EQ.finditer(trace.cot[a:b]):
            todo = [i for i in wanted.get(m.groups(), []) if i not in first]
            if todo:
                first[todo[0]] = j
    if len(first) < len(problem.steps):
        return None
    necessary = set(first.values())
    return [j not in necessary for j in range(len(spans))]


# --------------------------------------------------------------------------- supervised LoRA (one helper)

@dataclass(frozen=True)
class LoraHparams:
    """One supervised fine-tuning run: LoRA of ``rank`` on ``targets`` (``rank=0``: every weight, full fine-tuning),
    AdamW, ``warmup`` linear steps then a cosine down to ``min_lr_ratio`` × ``lr`` (ASAP's schedule), gradient norm
    clipped to ``max_grad_norm``. ``bf16``: the model's weights in bfloat16 (3x faster matrix products on a CPU with
    AMX than float32; autocast, which recasts every weight at every call, is slower); the LoRA weights and the
    optimizer stay float32. Full fine-tuning (``rank=0``) always trains float32 weights."""

    rank: int = 16
    alpha: int = 32
    targets: tuple[str, ...] = PROJECTIONS
    lr: float = 1e-3
    steps: int = 100
    batch_size: int = 8
    warmup: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_len: int = 640
    bf16: bool = True
    seed: int = 0
    micro_batch: int = 4  # examples per forward/backward (gradients accumulated over the batch): bounds the memory

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank >= 0):
            raise ValueError(f"rank={self.rank!r} must be an integer >= 0 (0 = full fine-tuning).")
        for name in ("steps", "batch_size", "max_len", "micro_batch"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer >= 1.")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup < 0:
            raise ValueError(f"lr={self.lr} must be > 0, min_lr_ratio in [0, 1], warmup >= 0.")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _tokenize_pair(tokenizer, prompt_text: str, completion_text: str, max_len: int) -> tuple[list[int], int]:
    p = tokenizer(prompt_text, add_special_tokens=False).input_ids
    c = tokenizer(completion_text, add_special_tokens=False).input_ids
    ids = (p + c)[:max_len]
    return ids, min(len(p), len(ids))


def _batch(tokenizer, pairs, max_len: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and the (row, position) of every completion token's *predecessor*."""
    enc = [_tokenize_pair(tokenizer, p, c, max_len) for p, c in pairs]
    n = max(len(ids) for ids, _ in enc)
    ids = torch.full((len(enc), n), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros(len(enc), n, dtype=torch.long)
    target = torch.zeros(len(enc), n, dtype=torch.bool)  # position t predicts token t + 1, a completion token
    for r, (x, start) in enumerate(enc):
        ids[r, :len(x)], mask[r, :len(x)] = torch.tensor(x), 1
        target[r, max(start - 1, 0):len(x) - 1] = True
    return ids.to(device), mask.to(device), target.to(device)


def completion_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the completion tokens only; for a Llama-style ``model.model`` +
    ``lm_head`` the output layer runs on those positions only."""
    base, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    rows, cols = target.nonzero(as_tuple=True)
    if base is not None and hasattr(base, "layers") and head is not None:
        logits = head(base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[rows, cols])
    else:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, cols]
    return F.cross_entropy(logits.float(), ids[rows, cols + 1])


def _trim_memory() -> None:
    """Give freed heap memory back to the system (glibc): batches of varying lengths otherwise fragment the heap and
    a training run's resident memory creeps up by gigabytes."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    return file_sha256(path)


def _wrap(model: nn.Module, hp: LoraHparams) -> nn.Module:
    """The model with trainable LoRA adapters (peft; base weights in bfloat16 when ``hp.bf16``), or the model itself
    with every weight trainable (rank 0, float32)."""
    if hp.rank == 0:
        model.float()
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    model.to(torch.bfloat16 if hp.bf16 else torch.float32)
    return add_adapters(model, rank=hp.rank, alpha=hp.alpha, targets=hp.targets, seed=hp.seed)


def _trainable(wrapped: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in wrapped.named_parameters() if p.requires_grad}


def _unwrap(wrapped: nn.Module, hp: LoraHparams) -> nn.Module:
    model = wrapped if hp.rank == 0 else merge_adapters(wrapped)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_adapter(model: nn.Module, hp: LoraHparams, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """``model`` with the trained weights of an ``sft`` run applied (LoRA merged into the weights), in eval mode."""
    wrapped = _wrap(model, hp)
    params = _trainable(wrapped)
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors))[:3], sorted(set(tensors) - set(params))[:3]
        raise ValueError(f"The saved weights do not fit this model (missing {missing}, unexpected {extra}).")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n].to(p.dtype))
    return _unwrap(wrapped, hp)


def sft(model: nn.Module, tokenizer, examples, hp: LoraHparams, *, folder: str | Path | None = None,
        eval_pairs=None, eval_every: int = 25, progress: bool = True, desc: str = "fine-tuning") -> tuple[nn.Module, dict]:
    """Supervised fine-tuning on ``examples`` ((prompt, completion) pairs), loss on the completion only.

    Batch ``s`` holds examples ``order[s·B : (s+1)·B]`` of a seeded permutation per epoch, so a run is a function of
    its hyperparameters. With ``folder``, a checkpoint (trained weights + AdamW state + history, checksummed) is
    written atomically every ``eval_every`` steps and a rerun resumes from it. ``eval_pairs``: held-out pairs whose
    mean completion loss is recorded every ``eval_every`` steps. Returns the merged model (eval mode) and
    ``{"history": [...], "trained": {name: tensor}, "tokens": ..., "seconds": ...}``.
    """
    from tqdm.auto import tqdm

    examples = list(examples)
    if not examples:
        raise ValueError("sft needs at least one (prompt, completion) example.")
    device = next(model.parameters()).device
    wrapped = _wrap(model, hp)
    params = _trainable(wrapped)
    opt = torch.optim.AdamW(list(params.values()), lr=hp.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(hp.seed)
    epochs = math.ceil(hp.steps * hp.batch_size / len(examples))
    order = torch.cat([torch.randperm(len(examples), generator=g) for _ in range(epochs)]).tolist()
    history: list[dict] = []
    start, tokens, seconds = 0, 0, 0.0
    ckpt = Path(folder) / "checkpoint.safetensors" if folder is not None else None
    if ckpt is not None and ckpt.is_file():
        start, history, tokens, seconds = _resume(ckpt, params, opt)
    def eval_loss() -> float | None:
        if not eval_pairs:
            return None
        wrapped.eval()
        with torch.inference_mode():
            losses = [float(completion_loss(wrapped, *_batch(tokenizer, eval_pairs[i:i + 8], hp.max_len, device)))
                      * 1 for i in range(0, len(eval_pairs), 8)]
        wrapped.train()
        return sum(losses) / len(losses)

    wrapped.train()
    bar = tqdm(range(start, hp.steps), desc=desc, disable=not progress, initial=start, total=hp.steps)
    for step in bar:
        t0 = time.perf_counter()
        pairs = [examples[i] for i in order[step * hp.batch_size:(step + 1) * hp.batch_size]]
        for group in opt.param_groups:
            group["lr"] = hp.lr_at(step)
        opt.zero_grad(set_to_none=True)
        # the batch's mean loss over its completion tokens, accumulated over micro-batches
        micro = [_batch(tokenizer, pairs[i:i + hp.micro_batch], hp.max_len, device)
                 for i in range(0, len(pairs), hp.micro_batch)]
        total = sum(int(t.sum()) for _, _, t in micro)
        loss_sum = 0.0
        for ids, mask, target in micro:
            part = completion_loss(wrapped, ids, mask, target) * (int(target.sum()) / total)
            part.backward()
            loss_sum += float(part.detach())
            tokens += int(mask.sum())
        torch.nn.utils.clip_grad_norm_(list(params.values()), hp.max_grad_norm)
        opt.step()
        del micro
        _trim_memory()
        seconds += time.perf_counter() - t0
        entry = {"step": step + 1, "loss": loss_sum, "lr": hp.lr_at(step), "tokens": tokens}
        if (step + 1) % eval_every == 0 or step + 1 == hp.steps:
            entry["eval_loss"] = eval_loss()
        history.append(entry)
        bar.set_postfix(loss=f"{entry['loss']:.3f}")
        if ckpt is not None and ((step + 1) % eval_every == 0) and step + 1 < hp.steps:
            _checkpoint(ckpt, params, opt, step + 1, history, tokens, seconds)
    bar.close()
    trained = {n: p.detach().cpu().clone() for n, p in params.items()}
    return _unwrap(wrapped, hp), {"history": history, "trained": trained, "tokens": tokens, "seconds": seconds}


def _checkpoint(path: Path, params: dict, opt: torch.optim.Optimizer, step: int, history: list, tokens: int,
                seconds: float) -> None:
    tensors = {f"param.{n}": p for n, p in params.items()}
    for n, p in params.items():
        st = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq", "step"):
            if k in st:
                tensors[f"adam.{k}.{n}"] = torch.as_tensor(st[k]).reshape(-1) if k == "step" else st[k]
    digest = _save(path, tensors)
    write_json(path.with_suffix(".json"), {"step": step, "history": history, "tokens": tokens, "seconds": seconds,
                                           "sha256": digest})


def _resume(path: Path, params: dict, opt: torch.optim.Optimizer) -> tuple[int, list, int, float]:
    from safetensors.torch import load_file

    try:
        meta = read_json(path.with_suffix(".json"))
        if file_sha256(path) != meta["sha256"]:
            raise ValueError("checksum mismatch")
        tensors = load_file(str(path))
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[f"param.{n}"])
                if f"adam.exp_avg.{n}" in tensors:
                    opt.state[p] = {"step": tensors[f"adam.step.{n}"].reshape(()).clone(),
                                    "exp_avg": tensors[f"adam.exp_avg.{n}"].clone(),
                                    "exp_avg_sq": tensors[f"adam.exp_avg_sq.{n}"].clone()}
        return int(meta["step"]), list(meta["history"]), int(meta["tokens"]), float(meta["seconds"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"{path} is unusable ({e}); training starts from step 0.", stacklevel=3)
        return 0, [], 0, 0.0


# --------------------------------------------------------------------------- cached runs (open_lth style)

TRACE_VERSION = 3  # part of every hash: a change to the trace writer or the prompts retrains


class CachedRun(RunFolder):
    """A LoRA model trained once in a run folder (``runs.RunFolder``: named by the hash of ``spec`` and
    ``TRACE_VERSION``, seeded from the repository's ``assets/``, with cached results beside the weights)::

        <cache>/<kind>/<hash>/checkpoint.*       while training: resumable, checksummed
        <cache>/<kind>/<hash>/weights.safetensors + metrics.json   written last: history, checksums, timings

    A seed without weights (``write_seed(..., weights=False)``) leaves ``metrics`` None: ``load()`` trains, while
    ``cached`` reads the seeded results. Subclasses give ``spec`` (a JSON-able dict), ``lora`` (LoraHparams),
    ``base_model()`` and ``examples()``."""

    kind = "run"
    lora: LoraHparams

    @property
    def hash(self) -> str:
        return digest({"spec": self.spec, "trace_version": TRACE_VERSION})

    def base_model(self) -> tuple[nn.Module, object]:
        raise NotImplementedError

    def examples(self, tokenizer) -> list[tuple[str, str]]:
        raise NotImplementedError

    def eval_examples(self, tokenizer) -> list[tuple[str, str]]:
        return []

    def train(self) -> dict:
        """Train the model now unless the folder holds a finished run; its verified metrics."""
        if self.metrics is None:
            self.load()
        return self.metrics

    def load(self, *, train: bool = True) -> tuple[nn.Module, object]:
        """``(model, tokenizer)``: the trained model, trained now when the folder has none (``train=False``: raise)."""
        from safetensors.torch import load_file

        self._check_folder()
        model, tok = self.base_model()
        m = self.metrics
        if m is None:
            if not train:
                raise FileNotFoundError(f"{self.dir} holds no finished run (train=False).")
            return self._train(model, tok)
        return load_adapter(model, self.lora, load_file(str(self.dir / "weights.safetensors"))), tok

    def _train(self, model: nn.Module, tok) -> tuple[nn.Module, object]:
        t0 = time.perf_counter()
        trained, info = sft(model, tok, self.examples(tok), self.lora, folder=self.dir,
                            eval_pairs=self.eval_examples(tok), progress=self.progress, desc=f"{self.kind} {self.hash[:6]}")
        files = {"weights.safetensors": _save(self.dir / "weights.safetensors", info["trained"])}
        write_json(self.dir / "metrics.json", {
            "hash": self.hash, "files": files, "history": info["history"], "train_tokens": info["tokens"],
            "train_seconds": info["seconds"], "wall_seconds": time.perf_counter() - t0,
            "tokens_per_second": info["tokens"] / max(info["seconds"], 1e-9), "threads": torch.get_num_threads()})
        for leftover in (self.dir / "checkpoint.safetensors", self.dir / "checkpoint.json"):
            leftover.unlink(missing_ok=True)
        return trained, tok



@dataclass(frozen=True)
class ReasonerHparams:
    """Everything that determines the reasoner: the problem family, the mix of styles in its training stream
    (verbose CoT, direct solution given the answer, answer only), the trace writer's redundancy, the fine-tuning."""

    family: Family = field(default_factory=Family)
    mix: tuple[float, float, float] = (0.8, 0.1, 0.1)
    redundancy: float = 0.7
    data_seed: int = 0
    lora: LoraHparams = field(default_factory=LoraHparams)
    base: str = "embedded"  # load_llm() (SmolLM2-135M-Instruct); or a model id / folder for load_llm(base)

    def __post_init__(self):
        if len(self.mix) != 3 or min(self.mix) < 0 or not math.isclose(sum(self.mix), 1.0):
            raise ValueError(f"mix={self.mix!r} must be three shares (verbose, direct, answer) summing to 1.")
        if not 0 <= self.redundancy < 1:
            raise ValueError(f"redundancy={self.redundancy} must be in [0, 1).")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ReasonerHparams":
        fam = {k: tuple(v) if isinstance(v, list) else v for k, v in d["family"].items()}
        lora = {k: tuple(v) if isinstance(v, list) else v for k, v in d["lora"].items()}
        return cls(family=Family(**fam), mix=tuple(d["mix"]), redundancy=d["redundancy"], data_seed=d["data_seed"],
                   lora=LoraHparams(**lora), base=d["base"])


def _load_base(base: str) -> tuple[nn.Module, object]:
    return load_llm(None if base == "embedded" else base)


def load_tokenizer(base: str = "embedded"):
    """The tokenizer alone (no model weights): what encoding and counting tokens need."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_folder() if base == "embedded" else base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


class UntrainedRun(CachedRun):
    """A model used as it is (the embedded base model, or a reasoning model from the hub such as
    DeepSeek-R1-Distill-Qwen-7B): no fine-tuning, only a folder ``<cache>/reasoner/<hash>`` for its cached results.
    Loaded in bfloat16."""

    kind = "reasoner"

    def __init__(self, base: str = "embedded", root: str | Path | None = None, *, progress: bool = True):
        self.base, self.lora = base, LoraHparams()
        self.spec = {"base": base, "untrained": True}
        super().__init__(root, progress=progress)

    @property
    def metrics(self) -> dict | None:
        return {"hash": self.hash, "untrained": True}

    def load(self, *, train: bool = True) -> tuple[nn.Module, object]:
        self._check_folder()
        model, tok = _load_base(self.base)
        return model.to(torch.bfloat16).eval(), tok


def training_examples(hp: ReasonerHparams, tokenizer, n: int | None = None, *, split: str = "train",
                      seed: int | None = None) -> list[tuple[str, str]]:
    """The reasoner's training stream: one (prompt, completion) pair per problem, its style drawn from ``hp.mix``."""
    n = n if n is not None else hp.lora.steps * hp.lora.batch_size
    seed = hp.data_seed if seed is None else seed
    rng = random.Random(f"styles:{seed}")
    out = []
    for i, p in enumerate(make_problems(n, split=split, seed=seed, family=hp.family)):
        style = rng.choices(("verbose", "direct", "answer"), weights=hp.mix)[0]
        if style == "verbose":
            cot = verbose_trace(p, seed=i, redundancy=hp.redundancy).cot
            out.append((prompt(tokenizer, p, "verbose"), completion(cot, p.answer)))
        elif style == "direct":
            out.append((prompt(tokenizer, p, "direct"), completion(direct_solution(p), p.answer)))
        else:
            out.append((prompt(tokenizer, p, "answer"), f" {p.answer}.<|im_end|>"))
    return out


class ReasonerRun(CachedRun):
    """The reasoner of ``hp``, trained once and cached under ``<cache>/reasoner/<hash>``."""

    kind = "reasoner"

    def __init__(self, hp: "ReasonerHparams", root: str | Path | None = None, *, progress: bool = True):
        self.hp, self.lora = hp, hp.lora
        self.spec = hp.to_dict()
        super().__init__(root, progress=progress)

    def base_model(self):
        return _load_base(self.hp.base)

    def examples(self, tokenizer):
        return training_examples(self.hp, tokenizer)

    def eval_examples(self, tokenizer):  # 16 held-out verbose traces: the training curve's held-out loss
        probs = make_problems(16, split="heldout", seed=10_000 + self.hp.data_seed, family=self.hp.family)
        return [(prompt(tokenizer, p, "verbose"), completion(verbose_trace(p, seed=i).cot, p.answer))
                for i, p in enumerate(probs)]


# The classroom reasoner: 2-3 operations, re-checks after 40% of the computations, 240 LoRA steps of 8 traces; on
# trace writer version 3 (e394243a, 49 min on 2 cores) it solves 38/60 held-out problems with a CoT (2 operations
# 31/40, 3 operations 7/20). The same hyperparameters on version 2 (7dd51498) solved 25/60 (its summary wrote the
# answer before the equation), on version 1 (51435c14) 34/60, but version 1's CoTs gave their labels away (see
# verbose_trace). Earlier candidates below the 40% floor: 020b9f3b (3-4 operations, 80 steps) 8/60;
# 489df6c8 (version 1, 120 steps) 20/60.
CLASSROOM = ReasonerHparams(family=Family(steps=(2, 3)), redundancy=0.4, lora=LoraHparams(steps=240))
SMOKE = ReasonerHparams(family=CLASSROOM.family, redundancy=CLASSROOM.redundancy,
                        lora=LoraHparams(steps=2, batch_size=2, warmup=1))
# The long-CoT reasoner of chapter 4 (LazyEviction is a claim about long reasoning): the classroom family and
# fine-tuning, but the trace writer re-checks after 90% of the computations, so its traces run a median of 288 tokens
# (88% of 200 training traces are 200 tokens or more) against the classroom's 192. Trained once (651560df: 82 min on 2
# cores, 4,932 s) and shipped as a seed in assets/.
LONG = ReasonerHparams(family=CLASSROOM.family, redundancy=0.9, lora=LoraHparams(steps=240))


def load_reasoner(hp: ReasonerHparams = CLASSROOM, *, root: str | Path | None = None, train: bool = True,
                  progress: bool = True) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` of the reasoner of ``hp``: loaded from the cache, or trained first (``CLASSROOM``:
    44 min on 2 cores, 7-12 s per step; copied from the repository's seed in assets/ when there is one) and cached. The model
    is an ordinary ``LlamaForCausalLM`` in eval mode."""
    return ReasonerRun(hp, root, progress=progress).load(train=train)


# --------------------------------------------------------------------------- generation


@torch.inference_mode()
def generate(model: nn.Module, tokenizer, prompts: list[str], *, max_new_tokens: int = 400, batch_size: int = 16,
             temperature: float = 0.0, seed: int = 0, return_ids: bool = False, progress: bool = False) -> list[dict]:
    """Completions of ``prompts`` (greedy, or sampled at ``temperature`` with a local seed), batched by length with
    left padding, each stopped at the end-of-turn token: ``{"text", "new_tokens"}`` (and ``"ids"``, the generated
    token ids, with ``return_ids``) in the order of ``prompts``."""
    from tqdm.auto import tqdm

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[dict | None] = [None] * len(prompts)
    eos = tokenizer.eos_token_id
    for b in tqdm(range(0, len(order), batch_size), desc="generating", disable=not progress, leave=False):
        rows = order[b:b + batch_size]
        enc = left_padded(tokenizer, [prompts[i] for i in rows]).to(device)
        kw = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else dict(do_sample=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + b)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=eos, **kw)
        for r, ids in zip(rows, gen[:, enc.input_ids.shape[1]:].tolist()):
            n = ids.index(eos) + 1 if eos in ids else len(ids)
            out[r] = {"text": tokenizer.decode(ids[:n], skip_special_tokens=True), "new_tokens": n}
            if return_ids:
                out[r]["ids"] = ids[:n]
    return out


def cot_tokens(tokenizer, text: str) -> int:
    """Tokens of a completion's CoT (before "The answer is")."""
    cot = split_cot(text)
    return len(tokenizer(cot, add_special_tokens=False).input_ids) if cot else 0


def solve(model: nn.Module, tokenizer, problems: list[Problem], *, style: str = "verbose", max_new_tokens: int = 400,
          batch_size: int = 16, temperature: float = 0.0, seed: int = 0, progress: bool = False) -> list[dict]:
    """The model's answers to ``problems`` in ``style``: ``{"text", "answer", "correct", "cot_tokens",
    "new_tokens"}`` per problem (``"answer"`` style: the completion after "The answer is")."""
    prompts = [prompt(tokenizer, p, style) for p in problems]
    gens = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens if style != "answer" else 6,
                    batch_size=batch_size, temperature=temperature, seed=seed, progress=progress)
    out = []
    for p, g in zip(problems, gens):
        text = (ANSWER_PREFIX + g["text"]) if style == "answer" else g["text"]
        ans = parse_final(text)
        out.append({"text": text, "answer": ans, "correct": ans == p.answer,
                    "cot_tokens": cot_tokens(tokenizer, text) if style != "answer" else 0,
                    "new_tokens": g["new_tokens"]})
    return out
