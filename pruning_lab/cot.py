"""Chain-of-thought pruning: which reasoning steps can go (chapter 05).

A chain of thought (CoT) is split into steps (paragraphs, as in ASAP); each step gets a score (higher = keep); the
lowest-scoring steps are removed until a target share of the CoT's tokens is left; the question and the answer always
stay. Every score is one small object with one ``score(enc, logp, **context)``:

- ``FirstTokenSurprisal``: −log p of a step's *first* token given everything before it (ASAP's fine stage).
- ``MeanSurprisal``: the step's mean token surprisal (TokenSkip-style token importance, per step).
- ``AnswerGain``: log p(answer | CoT) − log p(answer | CoT without the step), every "without" variant batched.
- ``Position`` (later steps first), ``Random`` (one draw per seed: report its expectation over many seeds).
- ``ASAP``: the published method (Zeng et al., arXiv 2508.05988, code Zengwh02/ASAP): a coarse, anchor-guided stage
  (a *direct CoT* written by a model from the question and its answer; the CoT's steps that only follow paths the
  anchor does not take go), then first-token surprisal of the steps of the *coarse-pruned* CoT, removing the least
  surprising ones until the CoT fits a token budget (``prune(..., rule="remove")``). Where ours differs: ``ASAP_DIFFERENCES``.
- Surface baselines that read only the wording: ``Regex`` (e.g. "opens with Step k:", "writes an operator") and a
  bag-of-words classifier under cross-validation (``bag_of_words_scores``).

Scores that depend only on the unpruned prefix come from **one forward pass per trace** (``token_logprobs_batch``),
with exact token spans per step from the tokenizer's character offsets.

Problems, traces, prompts and the answer checker live in ``pruning_lab.reasoner`` (the chapter's small reasoner).
``load_jsonl`` reads GSM8K-style files, optionally with labelled steps (``file_trace`` turns those into a
``Trace``), exactly or refuses them naming file:line. ``StudentRun`` distils pruned
CoTs back into the reasoner (cached like the reasoner); ``sample_parallel`` + ``early_stop`` + ``vote_first`` are
DeepPrune's parallel traces with every token counted.
"""

from __future__ import annotations

import json
import math
import operator
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import reasoner as rs
from .data import left_padded as _left_pad
from .reasoner import ANSWER_PREFIX, SEGMENTERS, Problem, Trace, make_problems, parse_final, segment  # noqa: F401  (re-exported)

# --------------------------------------------------------------------------- problems from a file


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


def file_trace(problem: Problem) -> Trace:
    """The trace a problem file gave (``load_jsonl`` with ``steps``): its steps joined by blank lines, the
    problem's answer, and its labels (``redundant``; None when the file gave steps without labels)."""
    if not problem.trace_steps:
        raise ValueError("file_trace needs a problem whose file gave its steps (load_jsonl with \"steps\" "
                         "and \"labels\" on the line); for a generated problem use reasoner.verbose_trace.")
    redundant = None if problem.redundant is None else list(problem.redundant)
    return Trace(problem.question, "\n\n".join(problem.trace_steps), problem.answer, redundant)


# --------------------------------------------------------------------------- segmentation

# SEGMENTERS and segment live in reasoner (traces are written and labelled there) and are re-exported here.


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



def encode(tokenizer, trace: Trace, how: str = "paragraph", style: str = "verbose") -> Encoded:
    """Tokenise ``prompt + CoT + "\\n\\nThe answer is N."`` once (the reasoner's format: ``reasoner.prompt`` in
    ``style``, then its completion), with exact step spans from the tokenizer's offsets."""
    prompt = rs.prompt(tokenizer, trace.question, style)
    char_steps = segment(trace.cot, how)
    tail = f"\n\n{ANSWER_PREFIX} {trace.answer}."
    text = prompt + trace.cot + tail
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.offset_mapping[0]
    steps = token_spans(offsets, char_steps, len(prompt))
    a0 = len(prompt) + len(trace.cot) + len(f"\n\n{ANSWER_PREFIX}")
    answer = token_spans(offsets, [(0, len(f" {trace.answer}"))], a0)[0]
    return Encoded(trace, enc.input_ids[0], steps, char_steps, answer, steps[0][0])


def step_tokens(enc: Encoded) -> list[int]:
    return [b - a for a, b in enc.steps]


def _right_padded(seqs: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of 1-D id sequences right-padded into one batch."""
    n = max(len(x) for x in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, :len(x)], mask[r, :len(x)] = x, 1
    return ids.to(device), mask.to(device)


def _next_token_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
                         cols: torch.Tensor, *, argmax: bool = False):
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
    lp = logits.gather(-1, ids[rows, cols + 1][:, None])[:, 0] - torch.logsumexp(logits, -1)
    return (lp, logits.argmax(-1)) if argmax else lp


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
        seg = torch.repeat_interleave(torch.arange(len(enc.steps)), torch.tensor(step_tokens(enc)))
        tok = torch.cat([torch.arange(a, b) for a, b in enc.steps])
        sums = torch.zeros(len(enc.steps)).index_add_(0, seg, -logp[tok].float())
        return sums / torch.tensor([max(n, 1) for n in step_tokens(enc)], dtype=torch.float)


@dataclass(frozen=True)
class Position:
    """Later steps first (the answer is usually computed last)."""

    name = "position"

    def score(self, enc: Encoded, logp: torch.Tensor, **_) -> torch.Tensor:
        return torch.arange(len(enc.steps), dtype=torch.float)


@dataclass(frozen=True)
class Random:
    """One random ranking per (seed, trace). Report random pruning as an expectation over many seeds."""

    name = "random"
    seed: int = 0

    def score(self, enc: Encoded, logp: torch.Tensor, **_) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(enc.ids[-8:].sum()) + len(enc.ids))
        return torch.rand(len(enc.steps), generator=g)


@dataclass(frozen=True)
class Regex:
    """A surface baseline that reads only a step's wording: ``keep`` (1) when ``pattern`` is found in the step
    (``re.search``, multiline), 0 otherwise; ``keep_if_match=False`` reverses it."""

    pattern: str
    label: str = "regex"
    keep_if_match: bool = True

    @property
    def name(self) -> str:
        return self.label

    def score(self, enc: Encoded, logp: torch.Tensor | None = None, **_) -> torch.Tensor:
        hit = [bool(re.search(self.pattern, enc.trace.cot[a:b].strip(), re.M)) for a, b in enc.char_steps]
        return torch.tensor([float(h == self.keep_if_match) for h in hit])


@dataclass(frozen=True)
class AnswerGain:
    """log p(answer | CoT) − log p(answer | CoT without the step), all steps' variants in batched forwards."""

    name = "answer_gain"
    batch_size: int = 16

    def score(self, enc: Encoded, logp: torch.Tensor, *, model=None, **_) -> torch.Tensor:
        if model is None:
            raise ValueError("AnswerGain needs the model: score(..., model=model).")
        return leave_one_out(model, enc, logp, self.batch_size)["gain"]


def keep_ids(enc: Encoded, keep: list[int]) -> tuple[torch.Tensor, int, int]:
    """Ids of prompt + the kept steps (in order) + the answer tail; where the answer starts; its length."""
    parts = [enc.ids[:enc.prompt_len]] + [enc.ids[a:b] for i, (a, b) in enumerate(enc.steps) if i in set(keep)]
    parts.append(enc.ids[enc.steps[-1][1]:])
    ids = torch.cat(parts)
    return ids, len(ids) - (len(enc.ids) - enc.answer[0]), enc.answer[1] - enc.answer[0]

@torch.inference_mode()
def answer_logprob_batch(model: nn.Module, variants: list[tuple], batch_size: int = 16, *, greedy: bool = False):
    """log p(answer tokens) for many (ids, answer_start, answer_len) variants, right-padded in batches. With
    ``greedy``, also whether greedy decoding writes exactly the answer and the token after it (the full stop of
    "The answer is N."): the argmax at each of those positions is the token that is there."""
    device = next(model.parameters()).device
    out, ok = [], []
    for i in range(0, len(variants), batch_size):
        chunk = variants[i:i + batch_size]
        ids, mask = _right_padded([v for v, _, _ in chunk], device)
        extra = int(greedy)  # with greedy: one more position per variant, the token after the answer
        # position a-1+j predicts answer token j (rows and columns of the batch)
        rows = torch.cat([torch.full((k + extra,), r) for r, (_, _, k) in enumerate(chunk)])
        cols = torch.cat([torch.arange(a - 1, a - 1 + k + extra) for _, a, k in chunk])
        lp, arg = _next_token_logprobs(model, ids, mask, rows.to(device), cols.to(device), argmax=True)
        is_answer = torch.cat([torch.arange(k + extra) < k for _, _, k in chunk])
        out += torch.zeros(len(chunk), dtype=torch.float64).index_add_(
            0, rows[is_answer], lp.double().cpu()[is_answer]).tolist()
        if greedy:
            hit = (arg.cpu() == ids[rows.to(device), (cols + 1).to(device)].cpu()).long()
            ok += (torch.zeros(len(chunk), dtype=torch.long).index_add_(0, rows, hit)
                   == torch.tensor([k + 1 for _, _, k in chunk])).tolist()
    return (out, ok) if greedy else out


@torch.inference_mode()
def leave_one_out(model: nn.Module, enc: Encoded, logp: torch.Tensor | None = None, batch_size: int = 16) -> dict:
    """For every step ``i``, the CoT without it, read by ``model`` (one batched forward per ``batch_size``
    variants): ``gain`` = log p(answer | CoT) − log p(answer | CoT without i), and ``flips`` = whether the greedy
    reading of the answer (the argmax at each answer position, and the full stop after it) stops being the
    answer (a fixed reader's verdict: the step was needed)."""
    logp = token_logprobs(model, enc.ids) if logp is None else logp
    full = float(logp[enc.answer[0]:enc.answer[1]].sum())
    variants = [keep_ids(enc, [j for j in range(len(enc.steps)) if j != i]) for i in range(len(enc.steps))]
    lps, greedy = answer_logprob_batch(model, variants, batch_size, greedy=True)
    return {"gain": full - torch.tensor(lps), "flips": ~torch.tensor(greedy)}


# --------------------------------------------------------------------------- ASAP as published

ASAP_DIFFERENCES = (
    ("anchor (direct CoT)", "DeepSeek-V3 writes a step-by-step solution from the question and its final code",
     "the reasoner writes one in its trained \"direct\" style from the question and its answer (greedy)"),
    ("coarse stage", "DeepSeek-V3 compresses the CoT with the anchor as reference: drop alternative paths, keep the "
     "core path and the checks that support it, keep the wording; accepted when each kept paragraph matches an "
     "original one in order (difflib ratio >= 0.6)",
     "a rule in place of the LLM: a paragraph that writes equations, none of which is in the anchor, is an "
     "alternative path and goes; every other paragraph stays verbatim (so the acceptance test always passes)"),
    ("surprisal model", "DeepSeek-R1-Distill-Qwen-7B", "the reasoner itself"),
    ("fine-stage context", "the coarse-pruned CoT (the released prune-stage2.py reads the original CoT instead)",
     "the coarse-pruned CoT, as the paper says"),
    ("stopping rule", "remove the least surprising paragraph until the CoT has <= max_tokens tokens (1024 in "
     "prune.sh; default 0.8 x the original length)", "the same rule, with a share of the original CoT's tokens"),
    ("first-token positions", "found by re-tokenising prefixes (off by one where tokens merge across a boundary)",
     "exact spans from the tokenizer's character offsets"),
    ("distillation", "full SFT of Qwen2.5-Coder-7B-Instruct on DeepSeek-R1's pruned codeforces-cots CoTs (10 epochs, "
     "lr 2e-5, cosine to 10%)", "LoRA on the reasoner itself, on its own pruned CoTs (TokenSkip's protocol), a few "
     "dozen steps"),
    ("domain and scale", "competitive programming, CoTs of thousands of tokens, 7B-8B models",
     "arithmetic word problems of 2-3 operations, CoTs of a few hundred tokens at most, a 135M model"),
)


def equations(text: str) -> set[tuple[str, str, str, str]]:
    """The equations "a op b = c" a text writes (as strings, as written)."""
    return {m.groups() for m in rs._EQ.finditer(text)}


@dataclass(frozen=True)
class ASAP:
    """ASAP (anchor-guided, surprisal-based pruning) as a score: steps that the coarse stage removes score −inf
    (``prune`` always removes them), the others their first-token surprisal *in the coarse-pruned CoT* (one
    forward over it). Prune with ``prune(enc, scores, target, rule="remove")`` for the paper's stopping rule. Needs
    ``direct=`` (the anchor: a short solution written by a model from the question and its answer)."""

    name = "asap"

    @staticmethod
    def coarse(enc: Encoded, direct: str) -> list[int]:
        """The anchor-guided coarse stage: indices of the steps kept (see ``ASAP_DIFFERENCES``)."""
        anchor = equations(direct)
        kept = []
        for i, (a, b) in enumerate(enc.char_steps):
            eqs = equations(enc.trace.cot[a:b])
            if not eqs or eqs & anchor:
                kept.append(i)
        return kept

    def score(self, enc: Encoded, logp: torch.Tensor | None = None, *, model=None, direct: str | None = None,
              **_) -> torch.Tensor:
        if direct is None:
            raise ValueError("ASAP needs the anchor: score(..., direct=<the direct CoT of this problem>).")
        if model is None:
            raise ValueError("ASAP needs the model: score(..., model=model).")
        kept = self.coarse(enc, direct)
        out = torch.full((len(enc.steps),), -math.inf)
        if not kept:
            return out
        ids, _, _ = keep_ids(enc, kept)
        lp = token_logprobs(model, ids)
        sizes = step_tokens(enc)
        firsts = enc.prompt_len + torch.tensor([0] + [sizes[i] for i in kept[:-1]]).cumsum(0)
        out[torch.tensor(kept)] = -lp[firsts].float()
        return out


SCORES = {s.name: s for s in (FirstTokenSurprisal, MeanSurprisal, AnswerGain, Position, Random, ASAP)}


def get_score(score):
    """A score object from its name (``SCORES``), or the object itself."""
    if isinstance(score, str):
        if score not in SCORES:
            raise ValueError(f"Unknown step score {score!r}: choose one of {sorted(SCORES)}.")
        return SCORES[score]()
    if not hasattr(score, "score") or not hasattr(score, "name"):
        raise ValueError(f"{score!r} is not a step score (an object with .name and .score(enc, logp, ...)).")
    return score


def score_steps(model: nn.Module, enc: Encoded, score, *, logp: torch.Tensor | None = None, **context) -> torch.Tensor:
    """Scores of every step of one encoded trace (higher = keep). Pass ``logp`` (from ``token_logprobs_batch`` over
    many traces) to reuse one forward for every prefix-only score; ``context`` holds what a score needs besides the
    model (ASAP: ``direct=``)."""
    logp = token_logprobs(model, enc.ids) if logp is None else logp
    return get_score(score).score(enc, logp, model=model, **context)


# --------------------------------------------------------------------------- pruning


def _check_share(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name}={value!r} must be a share of the CoT's tokens in (0, 1].")
    return float(value)


def prune(enc: Encoded, scores: torch.Tensor, keep_fraction: float | None = None, *, max_tokens: int | None = None,
          threshold: float | None = None, rule: str = "remove") -> list[int]:
    """Indices of the steps to keep. The budget is ``keep_fraction`` of the CoT's tokens or ``max_tokens`` tokens;
    ``rule="remove"`` (ASAP's): steps scoring −inf go whatever the budget, then the lowest-scoring step is removed,
    one at a time (ties: the earlier first), until the rest fits; ``rule="closest"``: the same order, but the last
    removal happens only when it lands nearer the budget than keeping the step (a control pruned to the *same* token
    count as another method, not at most it); ``rule="fit"``: the highest-scoring steps that fit, skipping one that
    would overflow. Or ``threshold``: every step scoring at least that. Question and answer are
    never part of the CoT, so they always stay."""
    if len(scores) != len(enc.steps):
        raise ValueError(f"{len(scores)} scores for {len(enc.steps)} steps: give one score per step.")
    given = [x is not None for x in (keep_fraction, max_tokens, threshold)]
    if sum(given) != 1:
        raise ValueError("Give exactly one of keep_fraction (a share of the CoT's tokens), max_tokens or threshold.")
    scores = torch.as_tensor(scores, dtype=torch.float)
    if threshold is not None:
        return [i for i in range(len(enc.steps)) if float(scores[i]) >= threshold and float(scores[i]) > -math.inf]
    sizes = step_tokens(enc)
    if keep_fraction is not None:
        limit = _check_share("keep_fraction", keep_fraction) * sum(sizes)
    else:
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens={max_tokens!r} must be an integer >= 0.")
        limit = max_tokens
    if rule in ("remove", "closest"):
        kept = [i for i in range(len(sizes)) if float(scores[i]) > -math.inf]
        used = sum(sizes[i] for i in kept)
        for i in torch.argsort(scores, stable=True).tolist():
            if used <= limit + 1e-9:
                break
            if i in kept:
                if rule == "closest" and used - sizes[i] < limit and limit - (used - sizes[i]) >= used - limit:
                    break  # keeping this step leaves the CoT nearer the budget than removing it
                kept.remove(i)
                used -= sizes[i]
        return sorted(kept)
    if rule != "fit":
        raise ValueError(f"rule={rule!r}: choose 'remove' (ASAP's), 'closest' or 'fit'.")
    kept, used = [], 0
    for i in torch.argsort(scores, descending=True, stable=True).tolist():
        if float(scores[i]) > -math.inf and used + sizes[i] <= limit + 1e-9:
            kept.append(i)
            used += sizes[i]
    return sorted(kept)


def kept_tokens(enc: Encoded, keep: list[int]) -> int:
    sizes = step_tokens(enc)
    return sum(sizes[i] for i in keep)


def pruned_cot(enc: Encoded, keep: list[int]) -> str:
    """The CoT with only the ``keep`` steps, paragraphs joined by blank lines (the reasoner's format)."""
    keep = set(keep)
    return "\n\n".join(enc.trace.cot[a:b].strip() for i, (a, b) in enumerate(enc.char_steps) if i in keep)


# --------------------------------------------------------------------------- grading step scores against labels


def _check_labels(enc_or_trace, labels=None) -> tuple[list[bool], int]:
    if isinstance(enc_or_trace, Encoded):
        trace, n = enc_or_trace.trace, len(enc_or_trace.steps)
    else:
        trace, n = enc_or_trace, len(segment(enc_or_trace.cot, "paragraph"))
    labels = trace.redundant if labels is None else labels
    if labels is None:
        raise ValueError("Grading needs a labelled trace (its redundant is None): label it (reasoner.chain_labels), "
                         "or use file_trace on a problem file with labelled steps.")
    if len(labels) != n:
        raise ValueError(f"The trace has {len(labels)} label(s) for {n} step(s): give one label per step of this "
                         "segmentation.")
    return list(labels), n


def precision_recall(enc_or_trace, keep: list[int], labels: list[bool] | None = None) -> tuple[float, float]:
    """On a labelled trace (an ``Encoded`` one, or a ``Trace`` segmented by paragraphs): precision = share of the
    removed steps that were redundant; recall = share of the redundant steps that were removed (1.0 when there is
    nothing to count). Refuses labels that do not match the steps, and kept indices that are not steps."""
    labels, n = _check_labels(enc_or_trace, labels)
    kept = set()
    for i in keep:
        if isinstance(i, bool) or not hasattr(i, "__index__") or not 0 <= operator.index(i) < n:
            raise ValueError(f"keep holds {i!r}, not a step index of this trace (0 to {n - 1}).")
        kept.add(operator.index(i))
    removed = set(range(n)) - kept
    red = {i for i, r in enumerate(labels) if r}
    hit = len(removed & red)
    return (hit / len(removed) if removed else 1.0), (hit / len(red) if red else 1.0)


def roc_auc(values, positive) -> float:
    """P(value of a positive > value of a negative), ties counted half (the Mann-Whitney statistic); NaN when one
    class is empty."""
    v = torch.as_tensor(values, dtype=torch.float64)
    pos = torch.as_tensor(positive, dtype=torch.bool)
    if v.shape != pos.shape:
        raise ValueError(f"{len(v)} values for {len(pos)} labels.")
    a, b = v[pos], v[~pos]
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    gt = (a[:, None] > b[None, :]).double().sum() + 0.5 * (a[:, None] == b[None, :]).double().sum()
    return float(gt / (len(a) * len(b)))


def redundancy_auc(scores, labels) -> float:
    """How well a keep-score ranks the redundant steps below the necessary ones (1 perfect, 0.5 chance)."""
    return roc_auc(-torch.as_tensor(scores, dtype=torch.float64), labels)


def bag_of_words_scores(texts: list[list[str]], labels: list[list[bool]], *, folds: int = 5, first_word: bool = False,
                        seed: int = 0) -> list[torch.Tensor]:
    """A surface baseline: a logistic regression on the words of each step (``first_word``: on its opening word
    only), trained on the other folds of traces and applied to the held-out fold (grouped cross-validation, so no
    trace is scored by a model that saw it). Returns keep-scores (1 − P(redundant)) per trace."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    if len(texts) < folds:
        raise ValueError(f"{len(texts)} traces for {folds}-fold cross-validation: give at least {folds}.")
    flat = [(re.match(r"\W*(\w+)", s) or re.match(r"", s)).group(0).lower() if first_word else s
            for steps in texts for s in steps]
    y = [r for labs in labels for r in labs]
    groups = [i for i, steps in enumerate(texts) for _ in steps]
    x = CountVectorizer(token_pattern=r"[A-Za-z]+|\d+|[-+*=:]", ngram_range=(1, 1 if first_word else 2)).fit_transform(flat)
    out = torch.zeros(len(y), dtype=torch.float64)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [order[g] for g in groups]
    for train, test in GroupKFold(folds).split(x, y, shuffled):
        ys = [y[i] for i in train]
        if len(set(ys)) < 2:
            out[test] = 0.5
            continue
        clf = LogisticRegression(max_iter=2000).fit(x[train], ys)
        out[test] = torch.as_tensor(1 - clf.predict_proba(x[test])[:, list(clf.classes_).index(True)])
    res, k = [], 0
    for steps in texts:
        res.append(out[k:k + len(steps)].float())
        k += len(steps)
    return res


def grade(step_scores: dict[str, list[torch.Tensor]], labels: list[list[bool]]) -> dict[str, dict]:
    """Per score: the redundancy AUC of every trace with both kinds of steps, and their mean."""
    out = {}
    for name, per in step_scores.items():
        if len(per) != len(labels):
            raise ValueError(f"{name}: scores for {len(per)} traces, labels for {len(labels)}.")
        aucs = [redundancy_auc(s, l) for s, l in zip(per, labels)]
        ok = [a for a in aucs if a == a]
        out[name] = {"auc": sum(ok) / len(ok) if ok else float("nan"), "per_trace": aucs}
    return out


def necessary_tokens(e: Encoded, labels: list[bool]) -> int:
    """Tokens of a labelled CoT's necessary steps: the least a pruning that keeps every computation must keep."""
    return sum(n for n, r in zip(step_tokens(e), labels) if not r)


def oracle_precision_recall(encoded: list[Encoded], step_scores: list[torch.Tensor], labels: list[list[bool]]) -> dict:
    """Prune each trace to exactly the tokens of its necessary steps (ASAP's rule); mean precision and recall."""
    pr = []
    for e, s, lab in zip(encoded, step_scores, labels):
        pr.append(precision_recall(e, prune(e, s, max_tokens=necessary_tokens(e, lab)), lab))
    p, r = (list(x) for x in zip(*pr))
    return {"precision": sum(p) / len(p), "recall": sum(r) / len(r), "precision_per_trace": p, "recall_per_trace": r}


# --------------------------------------------------------------------------- distillation: think shorter


class StudentRun(rs.CachedRun):
    """The reasoner fine-tuned (LoRA) on ``examples`` — its own CoTs, pruned by ``method`` — cached under
    ``<cache>/students/<hash>``; the hash covers the reasoner, the examples' content and the fine-tuning."""

    kind = "students"

    def __init__(self, reasoner: "rs.ReasonerRun", method: str, examples: list[tuple[str, str]], lora: "rs.LoraHparams",
                 root: str | Path | None = None, *, progress: bool = True):
        self.reasoner, self.method, self._examples, self.lora = reasoner, method, list(examples), lora
        self.spec = {"reasoner": reasoner.hash, "method": method, "n_examples": len(self._examples),
                     "examples": rs.digest(self._examples), "lora": asdict(lora)}
        super().__init__(root, progress=progress)

    def base_model(self):
        return self.reasoner.load()

    def examples(self, tokenizer):
        return self._examples


def distill_examples(tokenizer, problems: list[Problem], cots: list[str]) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of the reasoner's format: the verbose prompt, the (pruned) CoT, the answer."""
    return [(rs.prompt(tokenizer, p, "verbose"), rs.completion(c, p.answer)) for p, c in zip(problems, cots)]


# --------------------------------------------------------------------------- parallel traces (DeepPrune)

PROBE = f"\n\n{ANSWER_PREFIX}"
PROBE_NEW_TOKENS = 4


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
def probe_answers(model: nn.Module, tokenizer, prompt_text: str, samples: list[dict], chunk: int, *,
                  batch_size: int = 16) -> list[dict[int, int | None]]:
    """The tentative answer of every sample after every ``chunk`` of its tokens (and at its end when it never
    wrote a final answer): greedy ``PROBE_NEW_TOKENS`` tokens after ``prefix + "\\n\\nThe answer is"``.
    Returns, per sample, ``{tokens generated so far: answer}``."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1 token.")
    device = next(model.parameters()).device
    p_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
    probe = tokenizer(PROBE, add_special_tokens=False).input_ids
    jobs = []
    for i, s in enumerate(samples):
        n = len(s["ids"])
        cuts = list(range(chunk, n, chunk))
        if s["answer"] is None:
            cuts.append(n)
        jobs += [(i, t) for t in cuts]
    out: list[dict[int, int | None]] = [{} for _ in samples]
    pad = tokenizer.pad_token_id
    for b in range(0, len(jobs), batch_size):
        part = jobs[b:b + batch_size]
        seqs = [p_ids + samples[i]["ids"][:t] + probe for i, t in part]
        n = max(map(len, seqs))
        ids = torch.tensor([[pad] * (n - len(x)) + x for x in seqs], device=device)
        mask = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in seqs], device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=PROBE_NEW_TOKENS, do_sample=False,
                             pad_token_id=pad)
        for (i, t), row in zip(part, gen[:, n:].tolist()):
            m = re.match(r"\s*(-?\d+)", tokenizer.decode(row, skip_special_tokens=True))
            out[i][t] = int(m.group(1)) if m else None
    return out


def probe_cost(tokenizer) -> int:
    """Tokens one probe costs: the probe's text read after the cached prefix, plus the tokens it generates."""
    return len(tokenizer(PROBE, add_special_tokens=False).input_ids) + PROBE_NEW_TOKENS


def _majority(answers: list[int | None]) -> int | None:
    from collections import Counter

    votes = Counter(a for a in answers if a is not None)
    return votes.most_common(1)[0][0] if votes else None


def vote_first(samples: list[dict], k: int, probes: list[dict] | None = None, cost: int = 0) -> dict:
    """"Stop after k traces": majority vote over the first ``k`` samples run to the end. A sample without a final
    answer is read by a final probe (its cost counted) when ``probes`` are given."""
    if not 1 <= k <= len(samples):
        raise ValueError(f"k={k} must be in [1, {len(samples)}].")
    answers, tokens = [], 0
    for i, s in enumerate(samples[:k]):
        tokens += len(s["ids"])
        a = s["answer"]
        if a is None and probes is not None:
            a = probes[i].get(len(s["ids"]))
            tokens += cost
        answers.append(a)
    return {"answer": _majority(answers), "tokens": tokens}


def early_stop(samples: list[dict], probes: list[dict], chunk: int, cost: int, *, min_group: int = 2) -> dict:
    """DeepPrune's parallel early stop, replayed on recorded samples: all samples advance ``chunk`` tokens at a
    time; after each chunk every running sample is probed (``cost`` tokens each) and ``stop_rule`` stops the ones
    whose tentative answer already has ``min_group`` others agreeing. The vote counts finished samples' final
    answers and stopped samples' last tentative answers. Returns the answer and every token spent (sampled +
    probes)."""
    n = len(samples)
    active = [True] * n
    tentative: list[int | None] = [None] * n
    used = [0] * n
    probe_tokens = 0
    lengths = [len(s["ids"]) for s in samples]
    t = 0
    while any(active):
        t += chunk
        for i in range(n):
            if not active[i]:
                continue
            used[i] = min(lengths[i], t)
            if lengths[i] <= t:  # finished: its final answer (or a final probe when it wrote none)
                active[i] = False
                tentative[i] = samples[i]["answer"]
                if tentative[i] is None:
                    tentative[i] = probes[i].get(lengths[i])
                    probe_tokens += cost
            else:
                tentative[i] = probes[i].get(t)
                probe_tokens += cost
        active = stop_rule(tentative, active, min_group)
    return {"answer": _majority(tentative), "tokens": sum(used) + probe_tokens, "sampled": sum(used),
            "probe_tokens": probe_tokens}


# --------------------------------------------------------------------------- notebook helpers


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


# --------------------------------------------------------------------------- the chapter's runs (notebook 05)


def score_own_cots(model: nn.Module, tokenizer, encoded: list[Encoded], problems: list[Problem], *,
                   max_new_tokens: int = 160) -> dict:
    """Every model score of the encoded CoTs from one forward per CoT (prefix scores), one batch of "without step i"
    forwards (answer gain, reader flips) and the reasoner's direct CoTs as ASAP's anchors; JSON-able (-inf as is)."""
    logps = token_logprobs_batch(model, [e.ids for e in encoded])
    loo = [leave_one_out(model, e, lp) for e, lp in zip(encoded, logps)]
    direct = rs.solve(model, tokenizer, problems, style="direct", max_new_tokens=min(160, max_new_tokens)) if problems else []
    anchors = [rs.split_cot(d["text"]) for d in direct]
    return {"first_token_surprisal": [FirstTokenSurprisal().score(e, lp).tolist() for e, lp in zip(encoded, logps)],
            "mean_surprisal": [MeanSurprisal().score(e, lp).tolist() for e, lp in zip(encoded, logps)],
            "answer_gain": [x["gain"].tolist() for x in loo], "flips": [x["flips"].tolist() for x in loo],
            "anchors": anchors,
            "asap": [ASAP().score(e, lp, model=model, direct=a).tolist() for e, lp, a in zip(encoded, logps, anchors)]}


def sample_parallel(model: nn.Module, tokenizer, problems: list[Problem], n: int, chunk: int, *, max_new_tokens: int,
                    temperature: float, seed: int = 0) -> dict:
    """``n`` sampled CoTs per problem and every sample's probed tentative answers every ``chunk`` tokens (JSON-able:
    probe positions as string keys)."""
    prompts = [rs.prompt(tokenizer, p) for p in problems for _ in range(n)]
    gens = rs.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                       return_ids=True, progress=True)
    samples = [[{"ids": g["ids"], "answer": rs.parse_final(g["text"])} for g in gens[i * n:(i + 1) * n]]
               for i in range(len(problems))]
    probes = [probe_answers(model, tokenizer, rs.prompt(tokenizer, p), s, chunk) for p, s in zip(problems, samples)]
    return {"samples": samples, "probes": [[{str(k): v for k, v in d.items()} for d in pr] for pr in probes]}


def score_colours(scores: torch.Tensor) -> list[float]:
    """Scores scaled to [0, 1] for ``render_html`` (0.5 for a step a stage removed outright, score -inf)."""
    finite = scores[torch.isfinite(scores)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    return [0.5 if not math.isfinite(float(v)) else (float(v) - lo) / (hi - lo + 1e-9) for v in scores]


@dataclass
class PrunedExplorer:
    """The explorer of notebook 05: ``show(score, keep_fraction, trace)`` displays one CoT pruned by a score."""

    encoded: list[Encoded]
    scores: dict[str, list[torch.Tensor]]

    def show(self, score: str, keep_fraction: float, trace: int = 0) -> None:
        from IPython.display import HTML, display

        e, s = self.encoded[trace], self.scores[score][trace]
        keep = prune(e, s, keep_fraction)
        display(HTML(render_html(e.trace, score_colours(s), f"{score}: keep {keep_fraction:.0%} of the CoT's tokens "
                                 "(struck = removed)", keep)))
