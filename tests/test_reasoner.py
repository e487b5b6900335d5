"""pruning_lab.reasoner: problems replay exactly and the splits are disjoint, the answer checker is exact, the trace
writer's labels come from the chain and its wording does not give them away, the LoRA fine-tuning (loss by hand,
resume == uninterrupted, cached folders refused/verified), generation equals one-by-one greedy decoding."""

import json
import math
import random
import re
import warnings

import pytest
import torch

from pruning_lab import cot, runs
from pruning_lab import reasoner as rs
from pruning_lab._io import file_sha256
from pruning_lab.models import tiny_llama


@pytest.fixture(scope="module")
def tok():
    return rs.load_tokenizer()


@pytest.fixture(scope="module")
def tiny(tok):
    return tiny_llama(0, vocab_size=len(tok), max_position_embeddings=1024)


# --------------------------------------------------------------------------- problems


def test_problems_replay_their_chain_exactly():
    for p in rs.make_problems(60, seed=0, split="any"):
        assert int(p.question.split(" has ")[1].split()[0]) == p.values[0]
        for (kind, k), a, c, eq in zip(p.ops, p.values, p.values[1:], p.steps):
            assert c == {"buy": a + k, "give": a - k, "double": 2 * a}[kind] and c > 0
            assert eq == f"{a} {rs._SYMBOL[kind]} {k} = {c}"
        assert p.answer == p.values[-1] and 3 <= len(p.ops) <= 4


def test_heldout_and_train_never_share_a_problem():
    train = {p.question for p in rs.make_problems(400, split="train", seed=0)}
    held = [p.question for p in rs.make_problems(100, split="heldout", seed=0)]
    assert not train & set(held) and all(rs.is_heldout(p) for p in rs.make_problems(20, split="heldout"))
    # the split is a property of the problem, not of the stream: other seeds agree
    assert not {p.question for p in rs.make_problems(100, split="train", seed=5)} & set(held)


def test_family_and_counts_are_checked():
    with pytest.raises(ValueError, match="steps"):
        rs.Family(steps=(3, 2))
    with pytest.raises(ValueError, match="n=0"):
        rs.make_problems(0)
    with pytest.raises(ValueError, match="split"):
        rs.make_problems(1, split="test")


# --------------------------------------------------------------------------- the answer checker


@pytest.mark.parametrize("text, want", [
    ("so 3 + 4 = 7.\n\nThe answer is 7.", 7),
    ("The answer is -3", -3),
    ("The answer is 12.<|im_end|>", 12),
    ("The answer is 5. Wait, no.\n\nThe answer is 6.", 6),  # the last one counts
    ("The answer is half of 5.", None),
    ("The answer is 5 or 6.", None),
    ("The answer is 12.5", None),
    ("The answer is 7. But maybe 8.", None),  # it must end there
    ("so she has 7 apples.", None),
    ("", None),
])
def test_parse_final_is_exact(text, want):
    assert rs.parse_final(text) == want


def test_prompt_styles(tok):
    p = rs.make_problems(1)[0]
    assert rs.prompt(tok, p).endswith("<|im_start|>assistant\n") and p.question in rs.prompt(tok, p)
    assert rs.prompt(tok, p, "answer").endswith(rs.ANSWER_PREFIX)
    assert f"{rs.ANSWER_PREFIX} {p.answer}." in rs.prompt(tok, p, "direct")
    with pytest.raises(ValueError, match="direct style needs the answer"):
        rs.prompt(tok, "A question?", "direct")
    with pytest.raises(ValueError, match="style"):
        rs.prompt(tok, p, "terse")


# --------------------------------------------------------------------------- traces and labels


def test_chain_labels_by_hand():
    p = rs.Problem("q", 9, steps=("3 + 4 = 7", "7 + 2 = 9"), values=(3, 7, 9), ops=(("buy", 4), ("buy", 2)))
    cot = ("Ann has 3.\n\nIf she buys 5 more, 3 + 5 = 8.\n\nShe buys 4 more, so 3 + 4 = 7.\n\n"
           "Let me check: 3 + 4 = 7.\n\nStep 5: 7 + 2 = 9.\n\nSo she has 9.")
    t = rs.Trace("q", cot, 9)
    assert rs.chain_labels(t, p) == [True, True, False, True, False, True]
    assert rs.chain_labels(rs.Trace("q", "Ann has 3.\n\n3 + 4 = 7.", 9), p) is None  # 7 + 2 = 9 never written
    # a chain that repeats an equation needs two steps that write it
    rep = rs.Problem("q", 7, steps=("3 + 4 = 7", "7 - 4 = 3", "3 + 4 = 7"), values=(3, 7, 3, 7),
                     ops=(("buy", 4), ("give", 4), ("buy", 4)))
    assert rs.chain_labels(rs.Trace("q", "3 + 4 = 7.\n\n7 - 4 = 3.\n\n3 + 4 = 7.\n\nYes.", 7), rep) == \
        [False, False, False, True]


def test_verbose_traces_are_labelled_by_the_chain_and_long(tok):
    lengths = []
    for i, p in enumerate(rs.make_problems(40, seed=2)):
        t = rs.verbose_trace(p, seed=i)
        assert t.redundant == rs.chain_labels(t, p) and t.redundant is not None
        assert sum(not r for r in t.redundant) == len(p.ops)  # one necessary step per operation of the chain
        assert "\n\n\n" not in t.cot and len(t.cot.split("\n\n")) == len(t.redundant)
        lengths.append(len(tok(t.cot, add_special_tokens=False).input_ids))
    assert sum(lengths) / len(lengths) >= 200  # long enough for chapter 4's decode-time eviction


def test_the_wording_does_not_give_the_labels_away():
    """Both kinds share openers ("Step k:" on redundant steps, "So"/"Now" on necessary ones) and sentence frames; a
    re-check can repeat a computation word for word; the opener alone is near chance."""
    steps, labels = [], []
    for i, p in enumerate(rs.make_problems(200, seed=4)):
        t = rs.verbose_trace(p, seed=i)
        steps += t.cot.split("\n\n")
        labels += t.redundant
    opener = lambda s: re.match(r"(Step \d+:|\w+)", s).group(1)
    nec = [s for s, r in zip(steps, labels) if not r]
    red = [s for s, r in zip(steps, labels) if r]
    assert any(opener(s).startswith("Step") for s in red) and any(opener(s) in ("So", "Now") for s in nec)
    assert any(re.search(r"\d+ [-+*] \d+ = \d+", s) for s in red)  # numbers and equations in both kinds
    # a step's text occurs both as a necessary and as a redundant step somewhere in the corpus
    assert set(nec) & set(red)
    # every step writes numbers, an operator and "=": a restatement writes the chain as one expression
    assert all(re.search(r"\d+ [-+*] \d+", s) and "=" in s for s in steps)
    # the best single opener as a classifier: close to the base rate
    counts = {}
    for s, r in zip(steps, labels):
        c = counts.setdefault(re.sub(r"\d+", "k", opener(s)), [0, 0])
        c[r] += 1
    best = sum(max(c) for c in counts.values()) / len(steps)
    base = max(sum(labels), len(labels) - sum(labels)) / len(labels)
    assert best - base < 0.05


def test_a_bag_of_words_classifier_reads_little_from_the_wording():
    """Trace writer versions 2 and 3: under grouped cross-validation a bag of words and bigrams ranks the redundant
    steps of the classroom family near chance (version 1, whose restatements wrote no operator, gave 0.62-0.65 here
    and 0.80 on the greedy reasoner's own CoTs)."""
    texts, labels = [], []
    for i, p in enumerate(rs.make_problems(200, seed=4, family=rs.CLASSROOM.family)):
        t = rs.verbose_trace(p, seed=i, redundancy=rs.CLASSROOM.redundancy)
        if 0 < sum(t.redundant) < len(t.redundant):
            texts.append(t.cot.split("\n\n"))
            labels.append(t.redundant)
    auc = cot.grade({"bow": cot.bag_of_words_scores(texts, labels)}, labels)["bow"]["auc"]
    assert 0.4 < auc < 0.58


def test_the_opening_paragraph_is_often_redundant():
    """Version 3 puts a detour before the first computation half the time (never before a doubling), so the opening
    paragraph, which carries the question's restatement, is redundant in about a third of the traces (36% of these
    400; verbose_trace's docstring), not a marker of "necessary"."""
    traces = [rs.verbose_trace(p, seed=i, redundancy=rs.CLASSROOM.redundancy)
              for i, p in enumerate(rs.make_problems(400, seed=1, family=rs.CLASSROOM.family))]
    first_redundant = sum(t.redundant[0] for t in traces) / len(traces)
    assert 0.30 < first_redundant < 0.42
    assert all(t.kinds[0] == "detour" for t in traces if t.redundant[0])  # only a detour makes the opening redundant


def test_direct_solution_and_completion():
    p = rs.make_problems(1, seed=1)[0]
    d = rs.direct_solution(p)
    assert len(d.split("\n\n")) == len(p.ops) and all(eq in d for eq in p.steps)
    assert rs.parse_final(rs.completion(d, p.answer)) == p.answer
    assert rs.split_cot(rs.completion(d, p.answer)) == d


# --------------------------------------------------------------------------- fine-tuning


def test_learning_rate_schedule_by_hand():
    hp = rs.LoraHparams(lr=1.0, steps=12, warmup=2, min_lr_ratio=0.1)
    assert [hp.lr_at(s) for s in (0, 1)] == [0.5, 1.0]
    assert hp.lr_at(2) == pytest.approx(1.0) and hp.lr_at(7) == pytest.approx(0.55)
    assert hp.lr_at(12) == pytest.approx(0.1) and hp.lr_at(40) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="rank"):
        rs.LoraHparams(rank=-1)


def test_completion_loss_equals_the_masked_cross_entropy(tiny, tok):
    pairs = [("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Hello there.<|im_end|>"),
             ("Q: 3 + 4?", " 7, because 3 + 4 = 7.")]
    ids, mask, target = rs._batch(tok, pairs, 64, "cpu")
    got = rs.completion_loss(tiny, ids, mask, target)
    labels = torch.full_like(ids, -100)
    for r, (p, c) in enumerate(pairs):
        n_p = len(tok(p, add_special_tokens=False).input_ids)
        n = int(mask[r].sum())
        labels[r, n_p:n] = ids[r, n_p:n]
    with torch.no_grad():
        want = tiny(input_ids=ids, attention_mask=mask, labels=labels).loss  # the HF peer
    assert float(got) == pytest.approx(float(want), abs=1e-5)


class TinyRun(rs.ReasonerRun):
    def base_model(self):
        tok = rs.load_tokenizer()
        return tiny_llama(0, vocab_size=len(tok), max_position_embeddings=1024), tok


def _hp(**kw):
    return rs.ReasonerHparams(lora=rs.LoraHparams(steps=6, batch_size=2, warmup=1, micro_batch=1, **kw))


def test_sft_learns_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path, tok, monkeypatch):
    hp = _hp(lr=5e-3)
    run = TinyRun(hp, tmp_path / "a", progress=False)
    model, _ = run.load()
    hist = run.metrics["history"]
    assert hist[-1]["loss"] < hist[0]["loss"] and run.metrics["train_tokens"] > 0
    assert not (run.dir / "checkpoint.safetensors").exists()
    # interrupted after the checkpoint of step 3, then resumed
    r2 = TinyRun(hp, tmp_path / "b", progress=False)
    r2._check_folder()
    real = rs._checkpoint

    def stop(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(rs, "_checkpoint", stop)
    with pytest.raises(KeyboardInterrupt):
        rs.sft(r2.base_model()[0], tok, r2.examples(tok), hp.lora, folder=r2.dir, eval_every=3, progress=False)
    monkeypatch.setattr(rs, "_checkpoint", real)
    resumed, info = rs.sft(r2.base_model()[0], tok, r2.examples(tok), hp.lora, folder=r2.dir, eval_every=3,
                           progress=False)
    straight, info2 = rs.sft(r2.base_model()[0], tok, r2.examples(tok), hp.lora, eval_every=3, progress=False)
    assert [h["loss"] for h in info["history"]] == [h["loss"] for h in info2["history"]]
    x = torch.randint(0, len(tok), (1, 12))
    with torch.no_grad():
        assert torch.equal(resumed(x).logits, straight(x).logits)


def test_cached_run_is_reloaded_verified_and_refuses_other_hyperparameters(tmp_path):
    hp = _hp()
    run = TinyRun(hp, tmp_path, progress=False)
    trained, _ = run.load()
    again, _ = TinyRun(hp, tmp_path, progress=False).load(train=False)
    x = torch.randint(0, 500, (1, 10))
    with torch.no_grad():
        assert torch.equal(trained(x).logits, again(x).logits)
    # a folder holding other hyperparameters is refused
    other = TinyRun(_hp(lr=2e-3), tmp_path, progress=False)
    other.dir = run.dir
    with pytest.raises(ValueError, match="different hyperparameters.*lora.lr"):
        other.load()
    # damaged weights: reported and trained again
    w = run.dir / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged"):
        assert TinyRun(hp, tmp_path, progress=False).metrics is None
    TinyRun(hp, tmp_path, progress=False).load()
    assert TinyRun(hp, tmp_path, progress=False).metrics is not None
    # cached results are keyed: the same key is read back without recomputing, another key recomputes
    calls = []
    assert run.cached("x", {"a": 1}, lambda: calls.append(1) or [1, 2]) == [1, 2]
    assert run.cached("x", {"a": 1}, lambda: calls.append(1) or [3]) == [1, 2] and len(calls) == 1
    assert run.cached("x", {"a": 2}, lambda: [3]) == [3]


def test_the_classroom_and_smoke_reasoners_differ_only_in_their_budget():
    a, b = rs.CLASSROOM.to_dict(), rs.SMOKE.to_dict()
    assert {k for k in a if a[k] != b[k]} == {"lora"}
    assert rs.ReasonerHparams.from_dict(json.loads(json.dumps(a))) == rs.CLASSROOM
    assert rs.ReasonerRun(rs.CLASSROOM).hash != rs.ReasonerRun(rs.SMOKE).hash


# --------------------------------------------------------------------------- generation


def test_batched_generation_equals_one_by_one_greedy(tiny, tok):
    prompts = ["Hello", "A much longer prompt with more words in it", "3 + 4 ="]
    got = rs.generate(tiny, tok, prompts, max_new_tokens=6, batch_size=2, return_ids=True)
    for p, g in zip(prompts, got):
        ids = tok(p, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            want = tiny.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        n = want.index(tok.eos_token_id) + 1 if tok.eos_token_id in want else len(want)
        assert g["ids"] == want[:n] and g["new_tokens"] == n
    # sampling is seeded locally and leaves the global generator alone
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    s1 = rs.generate(tiny, tok, prompts, max_new_tokens=5, temperature=1.0, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert s1 == rs.generate(tiny, tok, prompts, max_new_tokens=5, temperature=1.0, seed=7)


# --------------------------------------------------------------------------- seeds (runs trained once, shipped in the repo)


class _Fake(rs.CachedRun):
    """A cached run without a model: a finished run is written by hand."""

    kind = "fake"

    def __init__(self, root, seeds, x=1):
        self.spec, self.lora = {"x": x}, rs.LoraHparams()
        super().__init__(root, progress=False)
        self.seed_root = seeds

    def finish(self, payload: bytes = b"weights") -> None:
        self._check_folder()
        (self.dir / "weights.safetensors").write_bytes(payload)
        rs.write_json(self.dir / "metrics.json", {"hash": self.hash, "train_seconds": 60.0,
                                                  "files": {"weights.safetensors": file_sha256(self.dir / "weights.safetensors")}})


def _seeded_pair(tmp_path, weights=True):
    """A finished run with one cached result, written as a seed; and a fresh cache that sees the seed."""
    made = _Fake(tmp_path / "made", None)
    made.finish()
    made.cached("answers", {"k": 1}, lambda: [1, 2, 3])
    seed = runs.write_seed(made, tmp_path / "assets", weights=weights)
    return made, seed, _Fake(tmp_path / "cache", tmp_path / "assets")


def test_a_seed_is_verified_and_copied_into_an_empty_cache(tmp_path):
    made, seed, fresh = _seeded_pair(tmp_path)
    manifest = json.loads((seed / "seed.json").read_text())
    assert seed == tmp_path / "assets" / "fake" / made.hash and manifest["hash"] == made.hash
    assert set(manifest["files"]) == {"hparams.json", "metrics.json", "weights.safetensors",
                                      f"results/answers-{rs.digest({'k': 1})}.json"}
    assert not fresh.dir.exists()
    m = fresh.metrics  # copied now, checksums verified
    assert m is not None and m["train_seconds"] == 60.0 and (fresh.dir / "weights.safetensors").read_bytes() == b"weights"
    assert fresh.cached("answers", {"k": 1}, lambda: pytest.fail("recomputed a seeded result")) == [1, 2, 3]
    assert not list(fresh.dir.parent.glob(".seed-*"))  # no staging folder left behind
    # another hyperparameter has another hash: no seed, nothing copied
    assert _Fake(tmp_path / "cache", tmp_path / "assets", x=2).metrics is None


def test_a_damaged_seed_is_refused_before_anything_is_copied(tmp_path):
    _, seed, fresh = _seeded_pair(tmp_path)
    w = seed / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[0] ^= 0x01  # one bit
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"damaged: weights.safetensors .*checksum.*Nothing was copied"):
        fresh.metrics
    assert not fresh.dir.exists()
    # a seed whose manifest names another run is refused too
    w.write_bytes(b"weights")
    manifest = json.loads((seed / "seed.json").read_text())
    (seed / "seed.json").write_text(json.dumps(manifest | {"hash": "0" * 16}))
    with pytest.raises(ValueError, match="holds run '0000000000000000'"):
        _Fake(tmp_path / "cache", tmp_path / "assets").metrics


def test_a_seed_never_overwrites_a_finished_cache(tmp_path):
    made, seed, _ = _seeded_pair(tmp_path)
    mine = _Fake(tmp_path / "cache", None)  # trained here, other bytes (another machine's rounding)
    mine.finish(b"mine")
    mine.cached("answers", {"k": 2}, lambda: ["mine"])
    again = _Fake(tmp_path / "cache", tmp_path / "assets")
    assert again.metrics["files"]["weights.safetensors"] == file_sha256(mine.dir / "weights.safetensors")
    assert (mine.dir / "weights.safetensors").read_bytes() == b"mine"
    # the seed's results belong to other weights: not added
    assert not (mine.dir / "results" / f"answers-{rs.digest({'k': 1})}.json").exists()
    assert again.cached("answers", {"k": 2}, lambda: pytest.fail("recomputed")) == ["mine"]


def test_a_seed_without_weights_brings_results_and_the_training_record_only(tmp_path):
    made, seed, fresh = _seeded_pair(tmp_path, weights=False)
    assert "weights.safetensors" not in json.loads((seed / "seed.json").read_text())["files"]
    assert fresh.cached("answers", {"k": 1}, lambda: pytest.fail("recomputed")) == [1, 2, 3]
    assert fresh.metrics is None and fresh.training_record["train_seconds"] == 60.0
    assert not (fresh.dir / "weights.safetensors").exists() and not (fresh.dir / "metrics.json").exists()
    # an unfinished cache folder (hparams written, a checkpoint under way) gets the missing files, nothing replaced
    part = _Fake(tmp_path / "cache2", None)
    part._check_folder()
    (part.dir / "results").mkdir()
    (part.dir / "results" / f"answers-{rs.digest({'k': 1})}.json").write_text('{"key": {"k": 1}, "value": ["here"]}')
    late = _Fake(tmp_path / "cache2", tmp_path / "assets")
    assert late.cached("answers", {"k": 1}, lambda: pytest.fail("recomputed")) == ["here"]
    assert late.training_record["train_seconds"] == 60.0


def test_seeds_can_be_switched_off(tmp_path, monkeypatch):
    _seeded_pair(tmp_path)
    monkeypatch.setenv("PRUNING_LAB_SEEDS", "none")
    assert runs.seed_root() is None
    run = _Fake(tmp_path / "cache", None)
    assert run.seed_dir is None and run.metrics is None
    monkeypatch.setenv("PRUNING_LAB_SEEDS", str(tmp_path / "assets"))
    assert _Fake(tmp_path / "cache", None).metrics is not None


def test_the_committed_seeds_verify_and_name_their_runs():
    """The repository's seeds (assets/): every file matches its checksum, and the folder is the run its hparams hash to
    (a seed that no run asks for would be dead weight in git)."""
    root = runs.SEED_ROOT
    seeds = sorted(root.glob("*/*/seed.json")) if root.is_dir() else []
    assert seeds, "no seed in assets/: chapter 5's classroom run would train for an hour in CI"
    for manifest_path in seeds:
        folder, manifest = manifest_path.parent, json.loads(manifest_path.read_text())
        assert manifest["hash"] == folder.name and manifest["kind"] == folder.parent.name
        for name, digest in manifest["files"].items():
            assert file_sha256(folder / name) == digest, f"{folder / name}"
        spec = json.loads((folder / "hparams.json").read_text())
        trained = {"reasoner", "students"}  # reasoner.CachedRun's kinds: their hash includes the trace writer's version
        named = {"spec": spec, "trace_version": rs.TRACE_VERSION} if folder.parent.name in trained else {"spec": spec}
        assert rs.digest(named) == folder.name
    classroom = rs.ReasonerRun(rs.CLASSROOM)
    assert (root / "reasoner" / classroom.hash / "weights.safetensors").is_file()
