"""pruning_lab.cot: surprisal by hand, one pass == per-step forwards, segmentation round-trips, ASAP's two stages and
stopping rule by hand, pruning rules and refusals, grading (AUC by hand and against scikit-learn, bag of words under
grouped cross-validation), the exact problem-file loader, the parallel-trace accounting, and the notebook."""

import json
import math

import pytest
import torch

from pruning_lab import cot
from pruning_lab import reasoner as rs
from pruning_lab.models import tiny_llama


@pytest.fixture(scope="module")
def tok():
    return rs.load_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(0, vocab_size=len(tok), max_position_embeddings=1024)


@pytest.fixture(scope="module")
def problem():
    return rs.make_problems(1, seed=3)[0]


@pytest.fixture(scope="module")
def trace(problem):
    return rs.verbose_trace(problem, seed=1)


def _hand_trace():
    """A hand-made CoT of "3, buy 4, buy 2": a restatement, a detour, the computation, a re-check, the second
    computation, a summary."""
    p = rs.Problem("Ann has 3 apples. Then Ann buys 4 more. Then Ann buys 2 more. How many apples does Ann have now?",
                   9, steps=("3 + 4 = 7", "7 + 2 = 9"), values=(3, 7, 9), ops=(("buy", 4), ("buy", 2)))
    text = ("Ann has 3 apples.\n\nIf she buys 5 more, 3 + 5 = 8.\n\nShe buys 4 more, so 3 + 4 = 7.\n\n"
            "Let me check: 3 + 4 = 7.\n\nStep 5: 7 + 2 = 9.\n\nSo she has 9 apples.")
    t = rs.Trace(p.question, text, 9)
    t.redundant = rs.chain_labels(t, p)
    return p, t


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


# --------------------------------------------------------------------------- segmentation and encoding


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
    # the reasoner's format: its verbose prompt, then the completion it was trained on
    assert tok.decode(enc.ids[:enc.prompt_len]) == rs.prompt(tok, trace.question)


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
    variants = [(torch.randint(5, len(tok), (n,), generator=g), a, k) for n, a, k in ((20, 15, 3), (9, 7, 1), (31, 10, 2))]

    class Whole(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, **kw):
            return self.m(**kw)

    got = cot.answer_logprob_batch(model, variants, batch_size=2)
    whole, greedy = cot.answer_logprob_batch(Whole(model), variants, batch_size=3, greedy=True)
    for (x, a, k), g1, g2, ok in zip(variants, got, whole, greedy):
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=x[None]).logits[0].float(), -1)
        want = float(lp[a - 1:a - 1 + k].gather(-1, x[a:a + k, None]).sum())
        assert g1 == pytest.approx(want, abs=1e-4) and g2 == pytest.approx(want, abs=1e-4)
        assert ok == bool((lp[a - 1:a + k].argmax(-1) == x[a:a + k + 1]).all())


def test_leave_one_out_equals_separate_forwards(model, tok, trace):
    enc = cot.encode(tok, trace)
    logp = cot.token_logprobs(model, enc.ids)
    loo = cot.leave_one_out(model, enc, logp, batch_size=3)
    assert torch.equal(cot.AnswerGain(batch_size=3).score(enc, logp, model=model), loo["gain"])
    full = float(logp[enc.answer[0]:enc.answer[1]].sum())
    for i in range(len(enc.steps)):
        ids, start, n = cot.keep_ids(enc, [j for j in range(len(enc.steps)) if j != i])
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        assert float(loo["gain"][i]) == pytest.approx(full - float(lp[start - 1:start - 1 + n].gather(
            -1, ids[start:start + n, None]).sum()), abs=1e-3)
        # the reader's verdict: does greedy decoding still write " N." after "The answer is"?
        keeps = bool((logits[start - 1:start + n].argmax(-1) == ids[start:start + n + 1]).all())
        assert bool(loo["flips"][i]) == (not keeps)


def test_scores_are_objects_and_asap_is_one_of_them():
    assert isinstance(cot.get_score("asap"), cot.ASAP) and set(cot.SCORES) >= {
        "first_token_surprisal", "mean_surprisal", "answer_gain", "position", "random", "asap"}
    mine = cot.Regex(r"^Step", "step")
    assert cot.get_score(mine) is mine
    with pytest.raises(ValueError, match="Unknown step score"):
        cot.get_score("entropy")
    with pytest.raises(ValueError, match="not a step score"):
        cot.get_score(42)


def test_surface_regex_reads_the_wording_only(tok):
    _, t = _hand_trace()
    enc = cot.encode(tok, t)
    assert cot.Regex(r"^Step \d+:").score(enc).tolist() == [0, 0, 0, 0, 1, 0]
    assert cot.Regex(r"\d\s*[-+*]\s*\d", keep_if_match=False).score(enc).tolist() == [1, 0, 0, 0, 0, 1]


# --------------------------------------------------------------------------- ASAP


def test_asap_coarse_stage_by_hand(tok):
    p, t = _hand_trace()
    enc = cot.encode(tok, t)
    # the anchor takes the direct path: the detour (3 + 5 = 8) writes only equations the anchor never writes
    direct = "She buys 4 more: 3 + 4 = 7.\n\nShe buys 2 more: 7 + 2 = 9."
    assert cot.ASAP.coarse(enc, direct) == [0, 2, 3, 4, 5]
    # an anchor that is wrong takes the right steps with it (ASAP trusts its anchor)
    assert cot.ASAP.coarse(enc, "3 + 4 = 7. 7 + 3 = 10.") == [0, 2, 3, 5]


def test_asap_fine_stage_scores_first_tokens_in_the_coarse_cot(model, tok):
    p, t = _hand_trace()
    enc = cot.encode(tok, t)
    direct = "3 + 4 = 7.\n\n7 + 2 = 9."
    s = cot.ASAP().score(enc, None, model=model, direct=direct)
    kept = cot.ASAP.coarse(enc, direct)
    assert [i for i in range(len(s)) if math.isinf(float(s[i]))] == [1]
    ids, _, _ = cot.keep_ids(enc, kept)  # the coarse-pruned CoT, its first tokens by hand
    pos = enc.prompt_len
    for i in kept:
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids[None, :pos]).logits[0, -1].float(), -1)
        assert float(s[i]) == pytest.approx(-float(lp[ids[pos]]), abs=1e-4)
        pos += enc.steps[i][1] - enc.steps[i][0]
    with pytest.raises(ValueError, match="anchor"):
        cot.ASAP().score(enc, None, model=model)


def test_prune_remove_rule_is_asaps_stopping_rule(tok):
    _, t = _hand_trace()
    enc = cot.encode(tok, t)
    sizes = cot.step_tokens(enc)
    scores = torch.tensor([5.0, -math.inf, 3.0, 1.0, 4.0, 2.0])
    # -inf goes whatever the budget; then the least-scoring step, one at a time, until the rest fits
    assert cot.prune(enc, scores, 1.0) == [0, 2, 3, 4, 5]
    budget = sum(sizes) - sizes[1] - sizes[3]
    assert cot.prune(enc, scores, max_tokens=budget) == [0, 2, 4, 5]
    assert cot.prune(enc, scores, max_tokens=budget - 1) == [0, 2, 4]
    # ties: the earlier step goes first
    assert cot.prune(enc, torch.zeros(6), max_tokens=sum(sizes) - sizes[0]) == [1, 2, 3, 4, 5]
    # the greedy "fit" rule skips a step that would overflow and keeps looking
    fit = cot.prune(enc, scores, max_tokens=sizes[0] + sizes[5], rule="fit")
    assert 0 in fit and sum(sizes[i] for i in fit) <= sizes[0] + sizes[5]
    assert cot.prune(enc, scores, threshold=3.0) == [0, 2, 4]


def test_prune_closest_rule_lands_nearest_the_budget(tok):
    _, t = _hand_trace()
    enc = cot.encode(tok, t)
    sizes = cot.step_tokens(enc)
    scores = torch.tensor([5.0, 0.0, 3.0, 1.0, 4.0, 2.0])  # removal order: 1, 3, 5, 2, 4, 0
    after1, after2 = sum(sizes) - sizes[1], sum(sizes) - sizes[1] - sizes[3]
    # one token under "after step 1 goes": "remove" must go on (it allows at most the budget), "closest" stops there
    # when that is nearer than removing step 3 too, and removes it when that is nearer
    assert cot.prune(enc, scores, max_tokens=after1 - 1) == [0, 2, 4, 5]
    assert cot.prune(enc, scores, max_tokens=after1 - 1, rule="closest") == [0, 2, 3, 4, 5]
    assert cot.prune(enc, scores, max_tokens=after2 + 1, rule="closest") == [0, 2, 4, 5]
    assert cot.prune(enc, scores, max_tokens=after1, rule="closest") == cot.prune(enc, scores, max_tokens=after1)


@pytest.mark.parametrize("share", [0, 1.5, -0.1, "0.5", True])
def test_a_target_share_outside_0_1_is_refused_naming_the_parameter(tok, share):
    _, t = _hand_trace()
    enc = cot.encode(tok, t)
    with pytest.raises(ValueError, match=r"keep_fraction=.* must be a share of the CoT's tokens in \(0, 1\]"):
        cot.prune(enc, torch.zeros(6), share)


def test_prune_refuses_ambiguous_or_mismatched_requests(tok):
    _, t = _hand_trace()
    enc = cot.encode(tok, t)
    with pytest.raises(ValueError, match="exactly one"):
        cot.prune(enc, torch.zeros(6), 0.5, max_tokens=10)
    with pytest.raises(ValueError, match="5 scores for 6 steps"):
        cot.prune(enc, torch.zeros(5), 0.5)
    with pytest.raises(ValueError, match="rule"):
        cot.prune(enc, torch.zeros(6), 0.5, rule="best")


# --------------------------------------------------------------------------- grading


def test_precision_recall_by_hand_and_refusals(tok):
    t = rs.Trace("q", "a\n\nb\n\nc\n\nd", 1, redundant=[True, False, True, False])
    assert cot.precision_recall(t, keep=[1, 3]) == (1.0, 1.0)
    assert cot.precision_recall(t, keep=[0, 1]) == (0.5, 0.5)  # removed c (redundant) and d (necessary)
    assert cot.precision_recall(t, keep=[0, 1, 2, 3]) == (1.0, 0.0)
    with pytest.raises(ValueError, match=r"3 label\(s\) for 4 step\(s\)"):
        cot.precision_recall(rs.Trace("q", "a\n\nb\n\nc\n\nd", 1, redundant=[True, False, True]), keep=[0])
    with pytest.raises(ValueError, match="keep holds 4, not a step index"):
        cot.precision_recall(t, keep=[0, 4])
    with pytest.raises(ValueError, match="needs a labelled trace"):
        cot.precision_recall(rs.Trace("q", "a\n\nb", 1), keep=[0])


def test_roc_auc_by_hand_and_against_scikit_learn():
    from sklearn.metrics import roc_auc_score

    assert cot.roc_auc([3, 1, 2, 2], [True, False, True, False]) == pytest.approx(0.875)  # (1 + 1 + 1 + 0.5) / 4
    assert math.isnan(cot.roc_auc([1, 2], [True, True]))
    g = torch.Generator().manual_seed(0)
    v, y = torch.randint(0, 5, (50,), generator=g), torch.rand(50, generator=g) < 0.4
    assert cot.roc_auc(v, y) == pytest.approx(roc_auc_score(y.numpy(), v.numpy()))
    # a keep-score that ranks the redundant steps lowest is perfect
    assert cot.redundancy_auc([0.1, 5, 0.2, 7], [True, False, True, False]) == 1.0


def test_random_is_chance_as_an_expectation(tok):
    encs, labs = [], []
    for i, p in enumerate(rs.make_problems(10, seed=9)):
        t = rs.verbose_trace(p, seed=i)
        encs.append(cot.encode(tok, t))
        labs.append(t.redundant)
    aucs = [cot.grade({"r": [cot.Random(seed=d).score(e, None) for e in encs]}, labs)["r"]["auc"] for d in range(200)]
    assert sum(aucs) / len(aucs) == pytest.approx(0.5, abs=0.02)
    assert max(aucs) - min(aucs) > 0.1  # one draw is not the expectation


def test_bag_of_words_learns_a_word_that_gives_the_label_away_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    texts, labels = [], []
    for _ in range(30):
        red = (torch.rand(6, generator=g) < 0.5).tolist()
        texts.append([("Hmm, " if r else "So ") + f"{int(torch.randint(1, 50, (1,), generator=g))} apples." for r in red])
        labels.append(red)
    leak = cot.grade({"bow": cot.bag_of_words_scores(texts, labels)}, labels)["bow"]["auc"]
    assert leak > 0.95
    blind = [[s.replace("Hmm, ", "").replace("So ", "") for s in steps] for steps in texts]
    assert abs(cot.grade({"bow": cot.bag_of_words_scores(blind, labels)}, labels)["bow"]["auc"] - 0.5) < 0.15
    with pytest.raises(ValueError, match="at least 5"):
        cot.bag_of_words_scores(texts[:3], labels[:3])


def test_necessary_tokens_by_hand(tok):
    _, t = _hand_trace()
    enc = cot.encode(tok, t)
    sizes = cot.step_tokens(enc)
    assert cot.necessary_tokens(enc, [False] * len(sizes)) == sum(sizes)
    assert cot.necessary_tokens(enc, [i != 2 for i in range(len(sizes))]) == sizes[2]


def test_oracle_precision_recall_of_a_perfect_score_is_one(tok):
    _, t = _hand_trace()
    enc = cot.encode(tok, t)
    perfect = torch.tensor([0.0 if r else 1.0 for r in t.redundant])
    assert cot.oracle_precision_recall([enc], [perfect], [t.redundant])["precision"] == 1.0


# --------------------------------------------------------------------------- problem files


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


def test_voting_and_early_stop_count_every_token_by_hand():
    ids = lambda n: list(range(n))
    samples = [{"ids": ids(10), "answer": 5}, {"ids": ids(25), "answer": 5}, {"ids": ids(30), "answer": 5},
               {"ids": ids(12), "answer": None}]
    probes = [{8: 5}, {8: 5, 16: 5, 24: 5}, {8: 5, 16: 5, 24: 5}, {8: 3, 12: 3}]
    # plain voting: every sampled token; the sample without a final answer is read by one final probe
    assert cot.vote_first(samples, 4, probes, cost=9) == {"answer": 5, "tokens": 10 + 25 + 30 + 12 + 9}
    assert cot.vote_first(samples, 1) == {"answer": 5, "tokens": 10}
    # early stop, chunks of 8: at 8 tokens all four are probed (4 x 9); three say 5, so samples 1 and 2 stop
    # (sample 0, the first, represents the group); by 16 sample 0 has finished (10 tokens, its answer 5) and
    # sample 3 has finished at 12 without an answer: one final probe (9)
    out = cot.early_stop(samples, probes, 8, cost=9)
    assert out == {"answer": 5, "sampled": 10 + 8 + 8 + 12, "probe_tokens": 9 * 5, "tokens": 38 + 45}
    with pytest.raises(ValueError, match="k=5"):
        cot.vote_first(samples, 5)


def test_probe_answers_read_the_number_after_the_probe(model, tok):
    samples = [{"ids": tok(" 3 + 4 = 7.\n\nThe answer is 7.", add_special_tokens=False).input_ids, "answer": 7},
               {"ids": tok(" Hmm, 3 + 4", add_special_tokens=False).input_ids, "answer": None}]
    out = cot.probe_answers(model, tok, "Q?", samples, 4)
    n0, n1 = len(samples[0]["ids"]), len(samples[1]["ids"])
    assert set(out[0]) == set(range(4, n0, 4)) and set(out[1]) == set(range(4, n1, 4)) | {n1}
    assert all(v is None or isinstance(v, int) for d in out for v in d.values())
    assert cot.probe_cost(tok) == len(tok(cot.PROBE, add_special_tokens=False).input_ids) + cot.PROBE_NEW_TOKENS


# --------------------------------------------------------------------------- the notebook


def test_notebook_smoke_run(smoke_runs):
    results, nb_path = smoke_runs("05_cot_pruning")
    for key in ("base", "reasoner", "own_cots", "grading", "asap", "distill", "parallel", "conclusions"):
        assert key in results, key
    g = results["grading"]
    assert {"asap", "first_token_surprisal", "answer_gain", "random", "position", "opens_with_step_k",
            "bag_of_words_cv"} <= set(g["auc"])
    assert all(0 <= v <= 1 for v in g["auc"].values() if v is not None)
    d = results["distill"]
    assert set(d["accuracy"]) == {"unpruned", "asap", "random", d["rival"]}
    assert d["token_share"]["unpruned"] == 1.0 and d["token_share"]["asap"] <= results["params"]["asap_target"] + 1e-9
    # random and the rival were pruned trace by trace to the step cut closest to ASAP's tokens ("closest"), so their
    # token shares match ASAP's to within a fraction of a step (the classroom run: 0.57 and 0.59 vs 0.57)
    for name in ("random", d["rival"]):
        assert abs(d["token_share"][name] - d["token_share"]["asap"]) <= 0.05, (name, d["token_share"])
    par = results["parallel"]
    assert par["early"]["tokens"] > 0 and set(par["vote"]) == {str(k) for k in range(1, par["n"] + 1)}
    figs = nb_path.parent / "results" / "figures" / "05_cot_pruning"
    assert {"reasoner_training.png", "students.png", "parallel.png"} <= {p.name for p in figs.iterdir()}


def _committed():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = json.loads((root / "results" / "05_cot_pruning.json").read_text())
    nb = json.loads((root / "notebooks" / "05_cot_pruning.ipynb").read_text())
    return root, r, nb


def test_committed_run_matches_its_rendered_conclusion():
    """notebooks/05's conclusions are rendered from its results; this checks the committed classroom run: the claims'
    sizes (>= 50 held-out problems, >= 100 random draws, >= 20 parallel problems), a reasoner in the issue's range,
    every recorded verdict equal to the noise test recomputed from the recorded per-problem outcomes, and the rendered
    text being the recorded one."""
    from pruning_lab.stats import paired, paired_binary

    _, r, nb = _committed()
    p = r["params"]
    assert p["reasoner"] == "classroom" and p["n_heldout"] >= 50 and p["random_draws"] >= 100
    assert p["parallel_problems"] >= 20
    n = p["n_heldout"]
    rz = r["reasoner"]
    assert rz["n"] == n == len(rz["cot_correct"]) == len(rz["answer_correct"]) == len(r["base"]["cot_correct"])
    assert rz["cot_accuracy"] == pytest.approx(sum(rz["cot_correct"]) / n)
    assert rz["answer_accuracy"] == pytest.approx(sum(rz["answer_correct"]) / n)
    v = paired_binary(rz["cot_correct"], rz["answer_correct"])
    assert v["verdict"] == rz["cot_vs_answer"]["verdict"] == "A better"  # the CoT is clearly better (exact McNemar)
    assert v["p_value"] == pytest.approx(rz["cot_vs_answer"]["p_value"])
    assert 0.4 <= rz["cot_accuracy"] <= 0.9  # issue 21: a model that reasons, not one that saturates

    d = r["distill"]
    assert set(d["accuracy"]) == {"unpruned", "asap", "random", d["rival"]} and d["steps"] == p["distill_steps"]
    for name, acc in d["accuracy"].items():
        assert len(d["correct"][name]) == len(d["cot_tokens"][name]) == n
        assert acc == pytest.approx(sum(d["correct"][name]) / n)
        assert d["mean_cot_tokens"][name] == pytest.approx(sum(d["cot_tokens"][name]) / n)
    for key, t in d["tests"].items():
        a, b = key.split(" vs ")
        acc, toks = paired_binary(d["correct"][a], d["correct"][b]), paired(d["cot_tokens"][a], d["cot_tokens"][b])
        assert acc["verdict"] == t["accuracy"]["verdict"] and toks["verdict"] == t["tokens"]["verdict"], key
        assert toks["mean_difference"] == pytest.approx(t["tokens"]["mean_difference"])

    pa = r["parallel"]
    assert pa["problems"] == len(pa["correct"]["early"]) >= 20
    assert pa["early"]["accuracy"] == pytest.approx(sum(pa["correct"]["early"]) / pa["problems"])
    for key, other in (("early_vs_all", str(pa["n"])), ("early_vs_equal_spend", str(pa["k_equal_spend"]))):
        assert paired_binary(pa["correct"]["early"], pa["correct"][other])["verdict"] == pa[key]["verdict"]

    g = r["grading"]
    assert g["random_draws"] >= 100 and g["traces"] >= 20
    for name, v in g["vs_random"].items():
        assert paired(g["auc_per_trace"][name], g["auc_per_trace"]["random"])["verdict"] == v["verdict"], name

    rendered = [o for c in nb["cells"] if c["cell_type"] == "code" and "rec.record(conclusions=lines)" in "".join(c["source"])
                for o in c["outputs"] if "text/markdown" in o.get("data", {})]
    assert len(rendered) == 1 and "".join(rendered[0]["data"]["text/markdown"]) == "\n".join(r["conclusions"])


def test_readme_chapter_5_quotes_the_committed_run():
    """The README's chapter-5 paragraph states numbers of the committed classroom run; a rerun that changes them
    must change the README too."""
    root, r, _ = _committed()
    readme = (root / "README.md").read_text()
    text = readme[readme.index("### 05 · Chain-of-thought pruning"):readme.index("## Rerunning a notebook")]
    text = " ".join(text.split())
    g, ga, d, pa, rz = r["grading"], r["grading_after_opening"], r["distill"], r["parallel"], r["reasoner"]
    assert f"solves **{rz['cot_accuracy']:.0%}** with a CoT" in text
    assert (f"(2 operations {rz['accuracy_by_steps']['2']:.0%}, 3 operations {rz['accuracy_by_steps']['3']:.0%}) and "
            f"{rz['answer_accuracy']:.0%} answering directly") in text
    assert rz["cot_vs_answer"]["verdict"] == "A better" and rz["cot_vs_answer"]["p_value"] < 0.001
    assert f"solves {r['base']['cot_accuracy']:.0%} of {rz['n']} held-out" in text
    assert f"({r['own_cots']['correct']} correct, {r['own_cots']['labelled']} labelled" in text
    a = g["auc"]
    assert (f"redundancy AUC of {a['bag_of_words_cv']:.2f}, \"opens with *Step k:*\" {a['opens_with_step_k']:.2f}, "
            f"\"writes an operator\" {a['writes_an_operator']:.2f} (position {a['position']:.2f}, random "
            f"{a['random']:.2f})") in text
    null = g["cv_null"]["opening_word_cv"]
    assert a["opening_word_cv"] < null["low"]
    assert f"below chance ({a['opening_word_cv']:.2f}, outside the {null['low']:.2f}–{null['high']:.2f}" in text
    assert g["vs_random"]["asap"]["verdict"] == "A better" and max(a, key=lambda n: a[n]) == "asap"
    assert f"({a['asap']:.2f}, above random: paired t over {g['traces']} CoTs, p = {g['vs_random']['asap']['p_value']:.2g})" in text
    for n in ("first_token_surprisal", "answer_gain"):
        assert g["vs_random"][n]["verdict"] == "within noise", n
    assert f"first-token surprisal {a['first_token_surprisal']:.2f} and answer gain {a['answer_gain']:.2f} are within" in text
    after = ga["auc"]
    assert ga["vs_random"]["asap"]["verdict"] == "within noise" and f"ASAP falls to {after['asap']:.2f} (within noise)" in text
    assert [n for n in ("first_token_surprisal", "mean_surprisal", "answer_gain", "asap")
            if ga["vs_random"][n]["verdict"] == "A better"] == ["answer_gain"]
    assert (f"answer gain ({after['answer_gain']:.2f}) is the one score above random "
            f"(p = {ga['vs_random']['answer_gain']['p_value']:.2g})") in text
    assert d["rival"] == "answer_gain" and d["target"] == 0.8 and "the paper's 80% stopping rule" in text
    assert (f"({d['token_share']['asap']:.0%} of the tokens kept after its coarse stage; the necessary steps hold "
            f"{d['necessary_token_share']:.0%})") in text
    for name in ("unpruned", "asap", "random", d["rival"]):
        assert f"{d['accuracy'][name]:.0%} at {d['mean_cot_tokens'][name]:.0f}" in text, name
    assert f"({d['token_share']['random']:.0%} kept)" in text and f"answer gain ({d['token_share']['answer_gain']:.0%})" in text
    t = d["tests"]
    assert [t[k]["accuracy"]["verdict"] for k in ("asap vs unpruned", "asap vs random", "asap vs answer_gain")] == [
        "within noise"] * 3
    assert t["asap vs unpruned"]["tokens"]["verdict"] == "B better"  # ASAP's student writes fewer tokens
    assert f"within noise of it (exact McNemar, p = {t['asap vs unpruned']['accuracy']['p_value']:.2g})" in text
    assert (f"(p = {t['asap vs random']['accuracy']['p_value']:.2g} and "
            f"{t['asap vs answer_gain']['accuracy']['p_value']:.2g})") in text
    assert t["random vs unpruned"]["accuracy"]["verdict"] == "B better"
    assert f"only the random student is below the unpruned one (p = {t['random vs unpruned']['accuracy']['p_value']:.2g})" in text
    assert f"{1 - pa['early']['tokens'] / pa['vote'][str(pa['n'])]['tokens']:.0%} fewer tokens" in text
    assert f"reaches {pa['early']['accuracy']:.0%} vs {pa['vote'][str(pa['n'])]['accuracy']:.0%}" in text
    assert f"p = {pa['early_vs_all']['p_value']:.2g}" in text and pa["early_vs_all"]["verdict"] == "within noise"
    assert (f"stopping after {pa['k_equal_spend']} traces costs about as much and keeps "
            f"{pa['vote'][str(pa['k_equal_spend'])]['accuracy']:.0%}") in text
    assert f"{pa['early_wrong']['intermediate_value']} of the {pa['early_wrong']['problems']} problems" in text
