"""A retrieval task on real text: one fact ("needle") hidden at a chosen depth of a long passage.

Chapter 4 asks whether a model that keeps only part of its KV cache can still find a fact it read
thousands of tokens ago. Each item takes a contiguous passage of real prose from the corpus (cut at
paragraph boundaries), inserts one synthetic fact at a relative depth (0 = first paragraph, 1 = last)
and asks for it at the end, in the model's chat format::

    items = needle_items(tokenizer, corpus.heldout, n_items=4, context_tokens=1024, depths=(0.1, 0.5, 0.9))
    ids = tokenizer(items[0].prompt, add_special_tokens=False, return_tensors="pt").input_ids
    ...generate a few tokens greedily...
    is_correct(generated_text, items[0])

The fact is a made-up key-value pair ("The access code of the Harbor archive is 4821."), so the model
cannot know the answer from pre-training: it must read it from the context. Every item has a fact of
its own (its own name, place and code), so items are independent even when they share a passage. The
prompt ends with the start of the answer ("The access code of the Harbor archive is"). Chapter 4
reports what the full cache answers in its own run.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

NAMES = ("Harbor", "Maple", "Falcon", "Juniper", "Cobalt", "Orchid", "Granite", "Willow", "Saffron", "Aurora",
         "Pebble", "Summit", "Lantern", "Meadow", "Cedar", "Comet", "Hollow", "Prairie", "Quartz", "Tundra")
THINGS = ("archive", "vault", "locker", "server room", "workshop", "greenhouse")


@dataclass(frozen=True)
class NeedleItem:
    """One retrieval question: ``prompt`` (chat-formatted text, ready to tokenise without special
    tokens), the ``answer`` string, and where the fact sits (``depth`` in [0, 1], ``needle_char``:
    its character offset in ``prompt``; ``fact_span`` and ``answer_span``: the token indices [a, b) of
    the fact sentence and of the answer's digits in the tokenised prompt of ``n_tokens`` tokens)."""

    prompt: str
    answer: str
    fact: str
    question: str
    depth: float
    context_tokens: int
    needle_char: int
    n_tokens: int = 0
    fact_span: tuple[int, int] = (0, 0)
    answer_span: tuple[int, int] = (0, 0)
    passage: int = 0

    @property
    def tokens_after_answer(self) -> int:
        """Tokens from the end of the answer's digits to the end of the prompt: the fact lies outside a
        recency window of ``w`` tokens when this is ``>= w``."""
        return self.n_tokens - self.answer_span[1]


def _paragraphs(text: str) -> list[str]:
    """Non-empty blocks separated by blank lines, with reST markup lines (``.. x::``, rules) dropped."""
    paras = []
    for block in re.split(r"\n\s*\n", text):
        block = block.strip("\n")
        if not block.strip():
            continue
        if len(block.splitlines()) == 1 and re.fullmatch(r"\s*([=\-~^*#]{3,}|\.\. .*)", block.strip()):
            continue  # a lone rule or directive line
        paras.append(block)
    return paras


def _passage(tokenizer, paras: list[str], start: int, budget: int) -> list[str]:
    """Consecutive paragraphs from ``start`` (wrapping around) whose tokens add up to about ``budget``."""
    out, used, i = [], 0, start
    while used < budget:
        p = paras[i % len(paras)]
        n = len(tokenizer(p, add_special_tokens=False)["input_ids"]) + 2
        if used + n > budget and out:
            break
        out.append(p)
        used += n
        i += 1
        if i - start > len(paras):
            raise ValueError("The text is shorter than one passage of the requested length: give more text.")
    return out


def _token_span(offsets, a: int, b: int) -> tuple[int, int]:
    """Token indices [i, j) of the tokens that overlap characters [a, b)."""
    idx = [k for k, (s, e) in enumerate(offsets) if e > a and s < b]
    return idx[0], idx[-1] + 1


def needle_items(tokenizer, text: str, *, n_items: int = 4, context_tokens: int = 1024,
                 depths: tuple[float, ...] = (0.1, 0.5, 0.9), seed: int = 0,
                 prime_answer: bool = True) -> list[NeedleItem]:
    """``n_items`` passages × ``depths``: one item per (passage, depth), passages at seeded offsets.

    The fact is inserted as its own paragraph before paragraph ``round(depth * n)`` of the passage's
    ``n`` paragraphs (depth 1: after the last). Every item gets a fact of its own (a name and thing no
    other item uses, and a fresh 4-digit code), so no two items share an answer or a subject.
    ``context_tokens`` is the passage's length in tokens, about; the chat template, the fact and the
    question add ~60 tokens. ``prime_answer`` ends the prompt with the start of the answer
    ("The access code of the Harbor archive is"); without it the 135M model first restates the
    question (measured: 12 of 12 items began "The access code of the ..."), so it needs more new tokens.
    Raises ``ValueError`` for depths outside [0, 1], too little text or more items than subjects.
    """
    if n_items < 1 or context_tokens < 32:
        raise ValueError(f"n_items={n_items} must be >= 1 and context_tokens={context_tokens} >= 32.")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths={depths}: give relative depths in [0, 1] (0 = start of the passage).")
    subjects = [(n, t) for n in NAMES for t in THINGS]
    if n_items * len(depths) > len(subjects):
        raise ValueError(f"{n_items * len(depths)} items but only {len(subjects)} distinct subjects: ask for fewer.")
    paras = _paragraphs(text)
    if len(paras) < 4:
        raise ValueError("The text has fewer than 4 paragraphs: give a longer text (blank-line separated).")
    rng = random.Random(seed)
    chosen = rng.sample(subjects, n_items * len(depths))
    codes = rng.sample(range(1000, 10000), n_items * len(depths))
    items = []
    for k in range(n_items):
        passage = _passage(tokenizer, paras, rng.randrange(len(paras)), context_tokens)
        for j, depth in enumerate(depths):
            (name, thing), code = chosen[k * len(depths) + j], str(codes[k * len(depths) + j])
            subject = f"the access code of the {name} {thing}"
            fact = f"Remember this: {subject} is {code}."
            question = f"What is {subject}?"
            at = round(depth * len(passage))
            body = passage[:at] + [fact] + passage[at:]
            user = "Read the following text.\n\n" + "\n\n".join(body) + f"\n\nQuestion: {question}"
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                   add_generation_prompt=True)
            if prime_answer:
                prompt += subject[0].upper() + subject[1:] + " is"
            char = prompt.index(fact)
            enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
            digits = char + fact.index(code)
            items.append(NeedleItem(prompt=prompt, answer=code, fact=fact, question=question, depth=float(depth),
                                    context_tokens=context_tokens, needle_char=char, n_tokens=len(enc["input_ids"]),
                                    fact_span=_token_span(offsets, char, char + len(fact)),
                                    answer_span=_token_span(offsets, digits, digits + len(code)), passage=k))
    return items


def is_correct(generated: str, item: NeedleItem | str) -> bool:
    """The answer's digits appear as a whole number in the first line of the generated text.

    A number must match whole: "48211" or "482" do not count for 4821.
    """
    answer = item.answer if isinstance(item, NeedleItem) else str(item)
    first = generated.strip().splitlines()[0] if generated.strip() else ""
    return answer in re.findall(r"\d+", first.replace(",", ""))
