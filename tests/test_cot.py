"""pruning_lab.cot: surprisal by hand, one pass == per-step forwards, segmentation round-trips, pruning keeps
question and answer and hits its token target, synthetic labels, the parallel stop rule, bad input."""

import json
import math

import pytest
import torch

from pruning_lab import cot
from pruning_lab.models import tiny_llama


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from pruning_lab.models import embedded_model_folder

    return AutoTokenizer.from_pretrained(embedded_model_folder())


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(0, vocab_size=len(tok), max_position_embeddings=1024)


@pytest.fixture(scope="module")
def trace():
    return cot.synthetic_trace(cot.make_problems(1, seed=3)[0], seed=1, redundancy=1.0)


# --------------------------------------------------------------------------- data


def test_generated_problems_are_exact_and_synthetic_labels_match_the_answer():
    for p in cot.make_problems(30, seed=0):
        value = int(p.question.split(" has ")[1].split()[0])
        for work in p.steps:  # replay the necessary steps: they must reach the answer
            left, right = work.split(" = ")
            a, op, b = left.split()
            assert int(a) == value and int(right) == {"+": value + int(b), "-": value - int(b), "*": value * int(b)}[op]
            value = int(right)
        assert value == p.answer
        t = cot.synthetic_trace(p, seed=2)
        steps = t.cot.split("\n\n")
        assert len(steps) == len(t.redundant) == len(t.kinds)
        necessary = [s for s, r in zip(steps, t.redundant) if not r]
        assert len(necessary) == len(p.steps) and necessary[-1].endswith(f"= {p.answer}.")
        assert all(k == "necessary" for k, r in zip(t.kinds, t.redundant) if not r)


def _jsonl(tmp_path, *rows):
    path = tmp_path / "problems.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_loader_reads_gsm8k_answers_exactly(tmp_path):
    path = _jsonl(tmp_path, {"question": "1+1?", "answer": "It is 2.\n#### 2"}, "",
                  {"question": "big?", "answer": "600 + 634 = 1234\n#### 1,234"},
                  {"question": "3*4?", "answer": 12}, {"question": "neg?", "answer": " -7. "})
    probs = cot.load_jsonl(path)
    assert [(p.question, p.answer) for p in probs] == [("1+1?", 2), ("big?", 1234), ("3*4?", 12), ("neg?", -7)]
    assert all(p.trace_steps == () and p.redundant is None for p in probs)


@pytest.mark.parametrize("answer", ["#### half of 5", "3.5", "#### 5 or 6", True, None, "It is 2."])
def test_jsonl_loader_refuses_an_answer_that_is_not_exactly_one_integer(tmp_path, answer):
    path = _jsonl(tmp_path, {"question": "ok", "answer": 1}, {"question": "q", "answer": answer})
    with pytest.raises(ValueError, match=rf"problems\.jsonl:2: the answer .* is not exactly one integer"):
        cot.load_jsonl(path)


def test_jsonl_loader_refuses_a_bad_line_instead_of_skipping_it(tmp_path):
    good = {"question": "3*4?", "answer": 12}
    for bad, why in [({"question": "no answer"}, 'no "answer"'), ("{not json", "not JSON"),
                     ("[1, 2]", "not a JSON object"), ({"q": 1, "answer": 2}, 'no "question"')]:
        with pytest.raises(ValueError, match=rf"problems\.jsonl:3: {why}") as e:
            cot.load_jsonl(_jsonl(tmp_path, good, "", bad, good))
        assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        cot.load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no usable problem"):
        cot.load_jsonl(_jsonl(tmp_path, "", "  "))


def test_jsonl_loader_keeps_labelled_steps_and_file_trace_scores_them_by_hand(tmp_path):
    steps = ["We need the total.", "Step 1: 3 + 4 = 7.", "Let me check: 3 + 4 is 7.", "Step 2: 7 * 2 = 14."]
    path = _jsonl(tmp_path, {"question": "q1", "answer": "#### 14", "steps": steps,
                             "labels": ["redundant", "necessary", "redundant", "necessary"]},
                  {"question": "q2", "answer": 14, "steps": steps, "redundant": [True, False, True, False]},
                  {"question": "q3", "answer": 5, "steps": steps[:2]})
    a, b, c = cot.load_jsonl(path)
    assert a.trace_steps == b.trace_steps == tuple(steps) and a.redundant == b.redundant == (True, False, True, False)
    assert c.trace_steps == tuple(steps[:2]) and c.redundant is None
    t = cot.file_trace(a)
    assert (t.question, t.cot, t.answer, t.redundant) == ("q1", "\n\n".join(steps), 14, [True, False, True, False])
    assert cot.precision_recall(t, keep=[1, 3]) == (1.0, 1.0)
    assert cot.precision_recall(t, keep=[0, 1]) == (0.5, 0.5)  # removed step 2 (redundant) and step 3 (necessary)
    assert cot.file_trace(c).redundant is None
    with pytest.raises(ValueError, match="needs a labelled trace"):
        cot.precision_recall(cot.file_trace(c), keep=[0])
    with pytest.raises(ValueError, match="file_trace needs a problem whose file gave its steps"):
        cot.file_trace(cot.make_problems(1)[0])


def test_jsonl_loader_refuses_bad_steps_and_labels(tmp_path):
    steps = ["a.", "b.", "c."]
    cases = [({"steps": steps, "labels": ["necessary", "redundant"]}, r'2 "labels" for 3 "steps"'),
             ({"steps": steps, "redundant": [True, False, True, False]}, r'4 "redundant" for 3 "steps"'),
             ({"labels": ["necessary", "redundant"]}, r'"labels" without "steps"'),
             ({"steps": steps, "labels": ["necessary", "maybe", "redundant"]}, r'"labels" holds .maybe.'),
             ({"steps": steps, "redundant": [1, 0, 1]}, r'"redundant" holds 1'),
             ({"steps": ["only one"], "redundant": [True]}, r"\"steps\" must be a list of at least two"),
             ({"steps": ["a.", "  "], "redundant": [True, False]}, r"step 2 .* not a non-empty string"),
             ({"steps": ["a.\n\nb.", "c."], "redundant": [True, False]}, r"step 1 holds a blank line")]
    for extra, why in cases:
        with pytest.raises(ValueError, match=rf"problems\.jsonl:1: {why}"):
            cot.load_jsonl(_jsonl(tmp_path, {"question": "q", "answer": 3, **extra}))
    steps_only = _jsonl(tmp_path, {"question": "q", "answer": 3, "steps": steps})
    assert cot.load_jsonl(steps_only)[0].redundant is None
    with pytest.raises(ValueError, match=r"problems\.jsonl:1: \"steps\" without labels.*required"):
        cot.load_jsonl(steps_only, require_labels=True)
    with pytest.raises(ValueError, match=r"problems\.jsonl:1: no labelled steps.*required"):
        cot.load_jsonl(_jsonl(tmp_path, {"question": "q", "answer": 3}), require_labels=True)


# --------------------------------------------------------------------------- segmentation


@pytest.mark.parametrize("how", sorted(cot.SEGMENTERS))
def test_segmentation_round_trips(how):
    text = "Step 1: 3 + 4 = 7.\n\nStep 2: 7 * 2 = 14. Check it.\nStep 3: done!  \n\n So 14."
    spans = cot.segment(text, how)
    assert "".join(text[a:b] for a, b in spans) == text and len(spans) >= 2
    assert all(a < b for a, b in spans) and all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))


def test_segmentation_by_paragraph_by_hand():
    assert cot.segment("a b\n\nc\n\n\nd", "paragraph") == [(0, 5), (5, 9), (9, 10)]


def test_token_spans_are_exact(tok, trace):
    enc = cot.encode(tok, trace)
    # the tokens of each span decode to exactly that step's text, however the tokenizer merged the boundaries
    for (a, b), (ca, cb) in zip(enc.steps, enc.char_steps):
        assert tok.decode(enc.ids[a:b]).strip() == trace.cot[ca:cb].strip()
    assert tok.decode(enc.ids[enc.answer[0]:enc.answer[1]]).strip() == str(trace.answer)
    assert enc.steps[-1][1] <= enc.answer[0]


# --------------------------------------------------------------------------- scores


def test_first_token_surprisal_by_hand(model, tok, trace):
    enc = cot.encode(tok, trace)
    scores = cot.FirstTokenSurprisal().score(enc, cot.token_logprobs(model, enc.ids))
    for i, (a, _) in enumerate(enc.steps):
        with torch.no_grad():
            logits = model(input_ids=enc.ids[None, :a]).logits[0, -1]
        assert float(scores[i]) == pytest.approx(-float(torch.log_softmax(logits, -1)[enc.ids[a]]), abs=1e-4)


def test_one_pass_scores_equal_the_per_step_slow_computation(model, tok, trace):
    enc = cot.encode(tok, trace)
    logp = cot.token_logprobs(model, enc.ids)
    mean = cot.MeanSurprisal().score(enc, logp)
    for i, (a, b) in enumerate(enc.steps):  # slow: one forward per step prefix
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=enc.ids[None, :b]).logits[0, a - 1:b - 1], -1)
        slow = -lp.gather(-1, enc.ids[a:b, None]).mean()
        assert float(mean[i]) == pytest.approx(float(slow), abs=1e-4)


def test_batched_logprobs_equal_full_log_softmax_in_input_order(model, tok):
    # lengths out of order and a batch of 2, so sorting, padding and the output layer on real positions only
    # all matter; each row must equal the full-vocabulary log-softmax of its own unpadded forward
    seqs = [torch.randint(5, len(tok), (n,), generator=torch.Generator().manual_seed(n)) for n in (17, 5, 30, 9, 12)]
    got = cot.token_logprobs_batch(model, seqs, batch_size=2)
    for x, lp in zip(seqs, got):
        with torch.no_grad():
            full = torch.log_softmax(model(input_ids=x[None]).logits[0, :-1].float(), -1).gather(-1, x[1:, None])[:, 0]
        assert lp.shape == x.shape and lp[0] == 0
        assert torch.allclose(lp[1:], full, atol=1e-4)


def test_answer_logprobs_score_only_the_answer_positions_and_equal_the_full_log_softmax(model, tok):
    # answers of 3, 1 and 2 tokens at different places, batches of 2 and 3; the second model hides
    # model.model / lm_head, so the path that takes the logits of every position is checked too
    g = torch.Generator().manual_seed(1)
    variants = [(torch.randint(5, len(tok), (n,), generator=g), a, k) for n, a, k in ((20, 15, 3), (9, 8, 1), (31, 10, 2))]

    class Whole(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, **kw):
            return self.m(**kw)

    got = cot.answer_logprob_batch(model, variants, batch_size=2)
    whole = cot.answer_logprob_batch(Whole(model), variants, batch_size=3)
    for (x, a, k), g1, g2 in zip(variants, got, whole):
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=x[None]).logits[0].float(), -1)
        want = float(lp[a - 1:a - 1 + k].gather(-1, x[a:a + k, None]).sum())
        assert g1 == pytest.approx(want, abs=1e-4) and g2 == pytest.approx(want, abs=1e-4)


def test_answer_gain_equals_separate_forwards(model, tok, trace):
    enc = cot.encode(tok, trace)
    logp = cot.token_logprobs(model, enc.ids)
    gain = cot.AnswerGain(batch_size=3).score(enc, logp, model=model)
    full = float(logp[enc.answer[0]:enc.answer[1]].sum())
    for i in range(len(enc.steps)):
        ids, start, n = cot.keep_ids(enc, [j for j in range(len(enc.steps)) if j != i])
        lp = cot.token_logprobs(model, ids)
        assert float(gain[i]) == pytest.approx(full - float(lp[start:start + n].sum()), abs=1e-3)


def test_asap_ranks_anchors_first(model, tok, trace):
    enc = cot.encode(tok, trace)
    direct = " ".join(cot.make_problems(1, seed=3)[0].steps)
    s = cot.score_steps(model, enc, "asap", direct=direct)
    anchor = cot.anchors(enc, direct)
    assert anchor.any() and not anchor.all()
    assert s[anchor].min() > s[~anchor].max()


# --------------------------------------------------------------------------- pruning


def test_pruning_hits_the_token_target_and_keeps_question_and_answer(tok, trace):
    enc = cot.encode(tok, trace)
    sizes = [b - a for a, b in enc.steps]
    scores = torch.tensor([float(i % 3) for i in range(len(sizes))])
    for f in (0.2, 0.5, 0.8, 1.0):
        keep = cot.prune(enc, scores, f)
        assert sum(sizes[i] for i in keep) <= f * sum(sizes)
        # nothing else would fit: every dropped step is larger than the room left
        room = f * sum(sizes) - sum(sizes[i] for i in keep)
        assert all(sizes[i] > room for i in range(len(sizes)) if i not in keep)
        prompt = cot.answer_prompt(tok, trace, cot.pruned_cot(enc, keep))
        assert trace.question in prompt and prompt.endswith(cot.ANSWER_PREFIX)
    assert cot.prune(enc, scores, threshold=1.5) == [i for i in range(len(sizes)) if i % 3 == 2]


def test_precision_recall_by_hand():
    t = cot.Trace("q", "a\n\nb\n\nc\n\nd", 1, redundant=[True, False, True, False])
    assert cot.precision_recall(t, keep=[1, 3]) == (1.0, 1.0)
    assert cot.precision_recall(t, keep=[0, 1]) == (0.5, 0.5)  # removed c (redundant) and d (necessary)


def test_precision_recall_refuses_labels_that_do_not_fit_the_steps():
    with pytest.raises(ValueError, match=r"3 label\(s\) for 4 step\(s\)"):
        cot.precision_recall(cot.Trace("q", "a\n\nb\n\nc\n\nd", 1, redundant=[True, False, True]), keep=[0])
    with pytest.raises(ValueError, match="needs a labelled trace"):
        cot.precision_recall(cot.Trace("q", "a\n\nb", 1), keep=[0])
    t = cot.Trace("q", "a\n\nb", 1, redundant=[True, False])
    for bad in (2, -1):
        with pytest.raises(ValueError, match=rf"keep holds {bad}, not a step index"):
            cot.precision_recall(t, keep=[bad])


# --------------------------------------------------------------------------- parallel traces


def test_stop_rule_on_hand_made_partial_answers():
    # traces 0, 1, 2 agree on 14: one representative (the first still running) goes on; 3 and 4 differ
    assert cot.stop_rule([14, 14, 14, 9, None], [True] * 5, min_group=2) == [True, False, False, True, True]
    # a group of two is not enough when min_group is 2 (each has only one other member)
    assert cot.stop_rule([14, 14, 9], [True] * 3, min_group=2) == [True, True, True]
    # stopped members still count for the group, and an already stopped trace stays stopped
    assert cot.stop_rule([7, 7, 7], [False, False, True], min_group=2) == [False, False, True]


# --------------------------------------------------------------------------- bad input


def test_bad_input(tok):
    with pytest.raises(ValueError, match="empty"):
        cot.segment("   ")
    with pytest.raises(ValueError, match="at least two"):
        cot.segment("one single step", "paragraph")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        t = cot.synthetic_trace(cot.make_problems(1)[0])
        cot.prune(cot.encode(tok, t), torch.zeros(len(t.redundant)), 1.5)
    with pytest.raises(ValueError, match="Unknown step score"):
        cot.get_score("entropy")
    import os
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write('{"q": 1}\n')
    try:  # a bad line is refused with its file and line number, not warned about and skipped
        with pytest.raises(ValueError, match=rf"{os.path.basename(f.name)}:1: no \"question\""):
            cot.load_jsonl(f.name)
    finally:
        os.unlink(f.name)


# --------------------------------------------------------------------------- the notebook


def test_notebook_smoke_run(smoke_runs):
    results, nb_path = smoke_runs("05_cot_pruning")
    scores = ["first_token_surprisal", "answer_gain", "asap", "random", "position"]
    assert set(results["curves"]) == set(scores) and set(results["synthetic"]) == set(scores)
    for name in scores:
        pts = results["curves"][name]
        assert [p["target"] for p in pts] == [0.5, 1.0]
        assert all(p["tokens_kept"] <= p["target"] + 1e-9 for p in pts)
        assert pts[-1]["tokens_kept"] == 1.0 and pts[-1]["answer_logprob_retained"] == pytest.approx(1.0)
        assert 0 <= results["synthetic"][name]["precision"] <= 1 and 0 <= results["synthetic"][name]["recall"] <= 1
    # the full CoT helps the model: its answer is likelier after the CoT than with none
    assert results["answer_logprob"]["full"] > results["answer_logprob"]["none"]
    ft = results["finetune"]
    assert set(ft["before"]) == set(ft["after"]) == {"mean_cot_tokens", "accuracy"}
    par = results["parallel"]
    assert 0 < par["pruned"]["tokens"] <= par["plain"]["tokens"] and par["plain"]["tokens"] <= 3 * 16
    assert (nb_path.parent / "results" / "figures" / "05_cot_pruning" / "answer_logprob_retained.png").is_file()


def test_readme_quotes_the_committed_chapter_5_run():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = json.loads((root / "results" / "05_cot_pruning.json").read_text())
    readme = " ".join((root / "README.md").read_text().split())
    ag, rnd = r["synthetic"]["answer_gain"], r["synthetic"]["random"]
    assert f"precision and recall {ag['precision']:.2f}; random {rnd['precision']:.2f}/{rnd['recall']:.2f}" in readme
    assert ag["precision"] == ag["recall"] and r["synthetic"]["first_token_surprisal"]["recall"] < rnd["recall"]
    ft = r["finetune"]
    assert f"a {ft['steps']}-step LoRA" in readme
    assert f"from {ft['before']['mean_cot_tokens']:.0f} to {ft['after']['mean_cot_tokens']:.0f} tokens" in readme
    assert f"(accuracy {ft['before']['accuracy']:.0%} → {ft['after']['accuracy']:.0%}, within noise)" in readme
    assert ft["accuracy_paired"]["verdict"] == "within noise"
    par = r["parallel"]
    assert f"spent {1 - par['pruned']['tokens'] / par['plain']['tokens']:.0%} fewer tokens" in readme
    assert f"the {par['problems']} problems right" in readme
    assert f"right {round(r['own']['accuracy'] * r['own']['n'])} of {r['own']['n']} times" in readme
