"""pruning_lab.needle: the retrieval task's items are built as documented, and graded strictly."""

import pytest

from pruning_lab import needle


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from pruning_lab.models import embedded_model_folder

    return AutoTokenizer.from_pretrained(embedded_model_folder())


PARAS = [f"Paragraph {i} says that the value of item {i} is {i * 7} units." for i in range(200)]
TEXT = "\n\n".join(PARAS)


def test_fact_sits_at_the_requested_depth_once(tokenizer):
    items = needle.needle_items(tokenizer, TEXT, n_items=3, context_tokens=300, depths=(0.0, 0.5, 1.0), seed=1)
    assert len(items) == 9
    for k in range(3):
        same = items[3 * k:3 * k + 3]
        assert {it.passage for it in same} == {k}
        # One passage per group, a fact of its own per item: before every paragraph, in the middle, after all.
        bodies = [it.prompt.split("Read the following text.\n\n")[1].split("\n\nQuestion:")[0] for it in same]
        paras = [b.split("\n\n") for b in bodies]
        n = len(paras[0]) - 1  # paragraphs of the passage; the fact goes before paragraph round(depth * n)
        assert n >= 5 and [p.index(it.fact) for p, it in zip(paras, same)] == [0, round(0.5 * n), n]
        for it, body in zip(same, bodies):
            assert it.prompt.count(it.fact) == 1 and it.prompt.index(it.fact) == it.needle_char
            rest = body.replace(it.fact + "\n\n", "").replace("\n\n" + it.fact, "").split("\n\n")
            at = [PARAS.index(p) for p in rest]  # consecutive paragraphs of the text (wrapping around its end)
            assert all((b - a) % len(PARAS) == 1 for a, b in zip(at, at[1:]))
        around = {b.replace(it.fact + "\n\n", "").replace("\n\n" + it.fact, "") for b, it in zip(bodies, same)}
        assert len(around) == 1  # the same passage around each item's own fact
    # every item has its own answer and its own subject: no two items share a fact
    assert len({it.answer for it in items}) == 9 and len({it.question for it in items}) == 9
    n = len(tokenizer(items[0].prompt, add_special_tokens=False)["input_ids"])
    assert n == items[0].n_tokens and 300 <= n <= 300 + 120  # passage ~context_tokens, plus template and question


def test_token_spans_point_at_the_fact_and_its_digits(tokenizer):
    for it in needle.needle_items(tokenizer, TEXT, n_items=2, context_tokens=200, depths=(0.2, 0.8), seed=3):
        ids = tokenizer(it.prompt, add_special_tokens=False)["input_ids"]
        a, b = it.answer_span
        assert tokenizer.decode(ids[a:b]).strip() == it.answer and b - a == 4  # one token per digit
        fa, fb = it.fact_span
        assert tokenizer.decode(ids[fa:fb]).strip() == it.fact and fa < a < b < fb
        assert it.tokens_after_answer == len(ids) - b > 0


def test_prompt_is_chat_formatted_and_primed(tokenizer):
    it = needle.needle_items(tokenizer, TEXT, n_items=1, context_tokens=100, depths=(0.5,))[0]
    assert it.prompt.startswith("<|im_start|>system") and "<|im_start|>assistant\n" in it.prompt
    assert it.prompt.endswith("\n" + it.question[len("What is t"):].rstrip("?").join(["T", " is"]))
    bare = needle.needle_items(tokenizer, TEXT, n_items=1, context_tokens=100, depths=(0.5,), prime_answer=False)[0]
    assert bare.prompt.endswith("<|im_start|>assistant\n") and bare.answer == it.answer  # same seed, same fact


def test_grading_is_whole_number_on_the_first_line():
    item = "4821"
    assert needle.is_correct(" 4821.", item) and needle.is_correct("4,821", item)
    assert needle.is_correct(" The code is 4821, I think", item)
    assert not needle.is_correct(" 48211", item) and not needle.is_correct(" 482", item)
    assert not needle.is_correct(" I do not know.\n4821", item) and not needle.is_correct("", item)


def test_bad_input(tokenizer):
    with pytest.raises(ValueError, match="depths"):
        needle.needle_items(tokenizer, TEXT, depths=(1.5,))
    with pytest.raises(ValueError, match="fewer than 4 paragraphs"):
        needle.needle_items(tokenizer, "one\n\ntwo", context_tokens=64)
    with pytest.raises(ValueError, match="n_items"):
        needle.needle_items(tokenizer, TEXT, n_items=0)
    with pytest.raises(ValueError, match="distinct subjects"):
        needle.needle_items(tokenizer, TEXT, n_items=61, depths=(0.0, 1.0), context_tokens=40)
