"""Parameter values and ranges (pruning_lab.params): one rule for -p and YAML, one check before any kernel starts."""

import math
import time

import pytest

from pruning_lab import params, workbook
from pruning_lab.__main__ import main

from notebook_helpers import write_notebook


@pytest.mark.parametrize("text,value", [
    ("1e-3", 0.001), ("1E3", 1000.0), ("0.5", 0.5), (".5", 0.5), ("3", 3), ("-2", -2), ("1_000", 1000), ("010", 10),
    ("true", True), ("False", False), ("null", None), ("None", None), ("~", None),
    ("no", "no"), ("on", "on"), ("yes", "yes"), ("2026-01-01", "2026-01-01"), ("Pruning: x", "Pruning: x"),
    ("# not a comment", "# not a comment"), ("", ""), ("1e-3x", "1e-3x"), ("inf", "inf"), ("0x10", "0x10"),
    ("[0, 1, 2]", [0, 1, 2]), ("[no, 1e-3, 'x']", ["no", 0.001, "x"]), ("{a: 1}", {"a": 1}), ('"3"', "3"),
])
def test_one_rule_for_command_line_values(text, value):
    got = params.parse_value(text)
    assert got == value and type(got) is type(value)


def test_yaml_files_follow_the_same_rule():
    got = params.loads("a: 1e-3\nb: no\nc: 2026-01-01\nd: ~\ne:\nf: [0.5, 1]\ng: '1e-3'\nh: 24:00:00\ni: On\n"
                       "j: .inf\nk: None\nl: 'no'\n")
    assert got == {"a": 0.001, "b": "no", "c": "2026-01-01", "d": None, "e": None, "f": [0.5, 1], "g": "1e-3",
                   "h": "24:00:00", "i": "On", "j": math.inf, "k": None, "l": "no"}
    assert type(got["f"][1]) is int


def test_yaml_errors_are_one_line_with_file_line_and_column(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("seeds: [0, 1\nlr: 0.1\n")
    with pytest.raises(SystemExit) as err:
        params.load_yaml(bad)
    msg = str(err.value)
    assert msg.startswith(f"{bad}:2:3: ") and "\n" not in msg and "Fix the YAML" in msg
    bad.write_text("lr: 0.1\nlr: 0.2\n")  # PyYAML alone would keep the second silently
    with pytest.raises(SystemExit, match=r"broken.yaml:2:1: duplicate key 'lr'"):
        params.load_yaml(bad)
    with pytest.raises(SystemExit, match=r"^-p seeds '\[0, 1':1:6: .*expected ',' or '\]'"):
        params.parse_value("[0, 1", where="-p seeds")


@pytest.mark.parametrize("comment,inside,outside", [
    ("in (0, 1] share of the budget", [1, 0.5, 1e-9], [0, 1.5, -1, math.nan]),
    ("in [0, 1) every element", [0, 0.999], [1, -0.1]),
    ("in [2, 5]", [2, 5], [1.99, 5.01]),
    ("in (0, 10) x", [5], [0, 10]),
    (">= 1 number of items", [1, 10 ** 9], [0, -3]),
    ("> 0: a rate", [1e-12], [0]),
    ("<= 4 x", [4, -9], [4.5]),
    ("< -1e-3", [-1], [0]),
    ("in [0, inf) anything", [0, 1e300], [-1, math.inf]),
    (">= 1 or None: all of them", [1, None], [0]),
])
def test_declared_ranges(comment, inside, outside):
    rule = params.parse_rule(comment)
    assert all(rule.allows(x) for x in inside), rule
    assert not any(rule.allows(x) for x in outside), rule


def test_set_forms_and_what_is_not_a_range():
    rule = params.parse_rule("one of: prompt, decode  the moment of eviction", str)
    assert rule.choices == ("prompt", "decode") and rule.text == "one of: prompt, decode"
    assert params.parse_rule("one of: a, b, c (every element) ...", str).choices == ("a", "b", "c")
    assert params.parse_rule("one of: 2, 4, 6", int).choices == (2, 4, 6)
    for free in ("", "per seed: its own net", "in seconds", "or 'global'", "one of the two nets"):
        assert params.parse_rule(free) is None
    for typo in ("in (0, 1", "in [1, 0] backwards", ">= one", "one of:"):
        with pytest.raises(ValueError, match="range|empty"):
            params.parse_rule(typo)


def tiny(tmp_path, cell: str):
    return write_notebook(tmp_path / "93_params.ipynb", cell, "print('ran')")


def test_types_come_from_the_defaults(tmp_path):
    nb = tiny(tmp_path, 'lr = 0.001  # > 0\nsteps = 10  # >= 1\nflag = False\nname = "a"  # one of: a, b\n'
                        'ratios = [0.2, 0.5]  # in (0, 1) every element\nfree = 3\nmodel = None  # one of: x, y\n'
                        'anything = None\nlimit = 8  # >= 1 or None\nmix = [1, 0.5, "t"]\ntotals = []\n'
                        'expr = 2 * 3  # >= 1 an expression: not checked\n'
                        'words = ["a",\n         "b"]  # one of: a, b, c\n')
    ok = params.check(nb, {"lr": 1, "steps": 3, "flag": True, "name": "b", "ratios": [1e-3, 0.9], "free": -7,
                           "model": "y", "anything": [1, {"a": 2}], "limit": None, "mix": [2, "u", 0.1, 3.0],
                           "totals": ["x", 1], "expr": "whatever", "words": ["c", "a"]}, "-p")
    assert ok["lr"] == 1.0 and type(ok["lr"]) is float  # an int where a float is: passed on as a float
    assert type(ok["mix"][0]) is int and ok["model"] == "y" and ok["limit"] is None
    assert params.check(nb, {"model": None}, "-p") == {"model": None}  # a None default also takes None
    refusals = {
        "lr": ("1e-3x", "lr='1e-3x' is not allowed; 93_params.ipynb takes a number > 0 for lr."),
        "steps": (2.5, "steps=2.5 is not allowed; 93_params.ipynb takes an int >= 1 for steps."),
        "flag": ("no", "takes true or false for flag"),
        "name": ("c", "takes a string one of a, b for name"),
        "ratios": ([0.5, 1], "ratios=[0.5, 1] is not allowed; 93_params.ipynb takes a list, every element a "
                             "number in (0, 1) for ratios (element 1.0 is not in (0, 1))."),
        "free": ("3", "takes an int for free"),  # not annotated: its type is still checked
        "model": ("z", "takes None or a value one of x, y for model"),
        "limit": (0, "takes an int >= 1 or None for limit"),
        "mix": ([None], "(element None is None)"),
        "words": (["d"], "element 'd' is not one of a, b, c"),
    }
    for name, (value, expected) in refusals.items():
        with pytest.raises(SystemExit) as err:
            params.check(nb, {name: value}, "my.yaml")
        msg = str(err.value)
        assert msg.startswith(f"my.yaml: {name}=") and expected in msg and "\n" not in msg, msg
    with pytest.raises(SystemExit, match="steps=None is not allowed.*None is not allowed"):
        params.check(nb, {"steps": None}, "-p")
    with pytest.raises(SystemExit, match="flag=0 is not allowed"):  # 0 is not a boolean
        params.check(nb, {"flag": 0}, "-p")


def test_a_list_of_fractions_never_takes_1_as_one_token(tmp_path):
    # chapter 4's budgets: an int 1 in a list of fractions is 100% (a float), or refused by an open interval
    nb = tiny(tmp_path, "budgets = [0.15, 0.5]  # in (0, 1) share of the context kept\n"
                        "shares = [0.15, 0.5]  # in (0, 1] share of the context kept\n")
    with pytest.raises(SystemExit, match=r"budgets=\[1\] is not allowed.*element 1.0 is not in \(0, 1\)"):
        params.check(nb, {"budgets": [1]}, "-p")
    got = params.check(nb, {"shares": [1]}, "-p")["shares"]
    assert got == [1.0] and type(got[0]) is float
    with pytest.raises(SystemExit, match=r"budgets=\[0\] is not allowed"):
        params.check(nb, {"budgets": [0]}, "-p")


def test_a_later_layer_wins_and_each_value_is_checked_where_it_came_from(tmp_path):
    nb = tiny(tmp_path, "n = 3  # >= 1\nm = 2  # >= 1\n")
    assert params.resolve(nb, ("base.yaml", {"n": 5, "m": 7}), ("-p", {"n": 6})) == {"n": 6, "m": 7}
    with pytest.raises(SystemExit, match="^base.yaml: m=0"):
        params.resolve(nb, ("base.yaml", {"m": 0}), ("-p", {"m": 4}))


# --------------------------------------------------------------------------- one refusal per chapter (00, 01, 02)


def refused_fast(argv, *expected):
    """The command line refuses before any kernel starts: one line, in seconds, with each expected part."""
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as err:
        main(argv)
    took = time.perf_counter() - t0
    msg = str(err.value)
    assert "\n" not in msg and all(e in msg for e in expected), msg
    assert took < 10, f"{took:.1f} s: the refusal came after work started"
    return msg


def test_welcome_refuses_a_word_for_max_new_tokens(tmp_path):
    # before: a transformers TypeError after 102 s
    refused_fast(["run", "00", "-p", "max_new_tokens", "abc", "--out", str(tmp_path)],
                 "-p: max_new_tokens='abc' is not allowed; 00_welcome.ipynb takes an int >= 1 for max_new_tokens.")
    refused_fast(["run", "00", "-p", "max_new_tokens", "0", "--out", str(tmp_path)], "an int >= 1")
    refused_fast(["run", "00", "-p", "load_model", "no", "--out", str(tmp_path)], "load_model='no'", "true or false")
    assert not list(tmp_path.iterdir())


def test_magnitude_chapter_refuses_a_sparsity_of_1_5_from_a_file(tmp_path):
    # before: a ValueError after 74 s of dense training
    mine = tmp_path / "mine.yaml"
    mine.write_text("train_iterations: 100\nsparsities: [0.0, 0.9, 1.5]\n")
    refused_fast(["run", "01", "--params", str(mine), "--out", str(tmp_path / "o")],
                 f"{mine}: sparsities=[0.0, 0.9, 1.5] is not allowed; 01_global_magnitude.ipynb takes a list, "
                 "every element a number in [0, 1) for sparsities (element 1.5 is not in [0, 1)).")
    refused_fast(["run", "01", "--params", "smoke", "-p", "methods", "[global, magnitude]"],
                 "element 'magnitude' is not one of global, layerwise, erk")
    assert not (tmp_path / "o").exists()


def test_lottery_chapter_reads_1e_3_as_a_float_and_refuses_what_is_not_one(tmp_path):
    # before: "1e-3" was a string, and the run failed after 28 s with a TypeError deep inside
    nb = workbook.find_notebook("02")
    values, _ = workbook.resolve_parameters(nb, "smoke", {"lr": params.parse_value("1e-3")}, "-p")
    assert values["lr"] == 0.001 and values["fresh_run"] is True
    refused_fast(["run", "02", "--params", "smoke", "-p", "lr", "1e-3x", "--out", str(tmp_path)],
                 "-p: lr='1e-3x' is not allowed; 02_lottery_tickets.ipynb takes a number > 0 for lr.")
    refused_fast(["run", "02", "-p", "prune_rate", "1"], "prune_rate=1 is not allowed", "in (0, 1)")
    refused_fast(["run", "02", "-p", "model", "resnet"], "one of lenet, conv2, conv4, conv6")
    assert not list(tmp_path.iterdir())


def test_run_all_checks_every_notebook_before_the_first_runs(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(workbook, "run_notebook", lambda *a, **k: ran.append(a))
    refused_fast(["run", "all", "-p", "seeds", "[-1]", "--out", str(tmp_path)], "00_welcome.ipynb has no parameter named 'seeds'")
    assert ran == []


def test_missing_parameter_files_name_the_right_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nb = workbook.find_notebook("01")
    with pytest.raises(SystemExit, match=f"No parameter file missing.yaml: {tmp_path / 'missing.yaml'} does not exist"):
        workbook.load_params(nb, "missing.yaml")
    with pytest.raises(SystemExit, match="No parameter set 'smok' for 01_global_magnitude: give a YAML path, or one of "
                                         "paper, smoke"):
        workbook.load_params(nb, "smok")
