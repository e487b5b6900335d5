"""pruning_lab.needle: the retrieval task's items are built as documented, and graded strictly."""

import pytest

from pruning_lab import needle


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from pruning_lab.models import embedded_model_folder

    return AutoTokenizer.from_pretrained(embedded_model_folder())


TEXT = "\n\n".join(f"Paragraph {i} says that the value of item {i} is {i * 7} units." for i in range(200))


def test_fact_sits_at_the_requested_depth_once(tokenizer):
    items = needle.needle_items(tokenizer, TEXT, n_items=3, context_tokens=300, depths=(0.0, 0.5, 1.0), seed=1)
    assert len(items) == 9
    for k in range(3):
        same = items[3 * k:3 * k + 3]
        assert len({it.answer for it in same}) == 1 and len({it.fact for it in same}) == 1
        # One passage per group, the fact moves through it: before every paragraph, in the middle, after all.
        bodies = [it.prompt.split("Read the following text.\n\n")[1].split("\n\nQuestion:")[0] for it in same]
        paras = [b.split("\n\n") for b in bodies]
        n = len(paras[0]) - 1  # paragraphs of the passage; the fact goes before paragraph round(depth * n)
        assert n >= 5 and [p.index(same[0].fact) for p in paras] == [0, round(0.5 * n), n]
        for it, body in zip(same, bodies):
            assert it.prompt.count(it.fact) == 1 and it.prompt.index(it.fact) == it.needle_char
            assert body.replace(it.fact + "\n\n", "").replace("\n\n" + it.fact, "") in TEXT
    assert len({it.answer for it in items}) == 3  # a fresh code per passage
    n = len(tokenizer(items[0].prompt, add_special_tokens=False)["input_ids"])
    assert 300 <= n <= 300 + 120  # passage ~context_tokens, plus template, fact and question


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
