"""Notebook parameters: one rule for reading values, the ranges each notebook declares, one check before a run.

**Values.** ``-p NAME VALUE`` and every YAML file (smoke, paper, yours, sweeps) are read by one rule, the one a
Python user expects: ``true``/``false`` (any capitalisation of the first letter) are booleans, ``null``, ``~`` and
``None`` are None, ``3`` and ``1_000`` are ints, ``0.5``, ``1e-3`` and ``.inf`` are floats, ``[a, b]`` and
``{k: v}`` are lists and mappings, and everything else is a string: ``no``, ``on``, ``2026-01-01`` and
``Pruning: x`` stay text (YAML 1.1 would make them a boolean, a date and a mapping). Quoted values are always
strings. On the command line an empty value is the empty string.

**Ranges.** In a notebook's ``parameters`` cell the comment on a parameter's line may start with what the
parameter allows, then free text::

    x = 0.5            # in (0, 1] share of the budget ...
    ratios = [0.2]     # in [0, 1) every element ...
    n_items = 24       # >= 1 number of ...
    moment = "decode"  # one of: prompt, decode ...
    limit = 2048       # >= 1 or None: None scores everything ...

Forms: an interval ``in (a, b]`` (any of ``( [ ) ]``), a comparison ``>= a``, ``> a``, ``<= a``, ``< a``, or a
set ``one of: a, b, c`` (the items are the comma-separated words; the free text starts after the last word), each
optionally followed by ``or None``. A list parameter's rule applies to every element. A comment that starts
otherwise declares nothing.

**Types** come from the default: a bool takes only ``true``/``false``; an int only an int; a float an int or a
float (an int is passed on as a float, so ``[1]`` for a list of fractions is ``[1.0]``, never "1 token"); a string
only a string; a list only a list, each element of one of the types its default's elements have. None is
refused unless the default is None (then any value is taken, or the declared set) or the comment says
``or None``. A parameter without a declared range is checked for its type only.

A refusal is one line: the notebook, the parameter, the value, what is allowed, and the file or ``-p`` it came
from. ``resolve`` checks everything before a kernel starts.
"""

from __future__ import annotations

import ast
import io
import json
import math
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

# --------------------------------------------------------------------------- the one rule for values

_INT = r"[-+]?\d+(?:_\d+)*"
_FLOAT = (r"[-+]?(?:\d+(?:_\d+)*\.\d*(?:_\d+)*|\.\d+(?:_\d+)*|\d+(?:_\d+)*(?=[eE]))(?:[eE][-+]?\d+)?"
          r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")


def _float(text: str) -> float:
    t = text.replace("_", "").lower()
    return {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}.get(t) or float(t)


# (YAML tag, pattern of a plain scalar, conversion, first characters)
_SCALARS: list[tuple[str, re.Pattern, Callable[[str], Any], str]] = [
    ("tag:yaml.org,2002:bool", re.compile(r"true|True|TRUE|false|False|FALSE"), lambda t: t.lower() == "true", "tTfF"),
    ("tag:yaml.org,2002:null", re.compile(r"~|null|Null|NULL|None"), lambda t: None, "~nN"),
    ("tag:yaml.org,2002:int", re.compile(_INT), lambda t: int(t.replace("_", ""), 10), "-+0123456789"),
    ("tag:yaml.org,2002:float", re.compile(_FLOAT), _float, "-+0123456789."),
]


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with the scalar rule above (YAML 1.2's core schema, Python's spellings), no
    timestamps or sexagesimal numbers, and duplicate keys refused."""

    yaml_implicit_resolvers: dict = {}

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


for _tag, _pattern, _convert, _first in _SCALARS:
    _Loader.add_implicit_resolver(_tag, re.compile(rf"^(?:{_pattern.pattern})$"), list(_first))
    _Loader.add_constructor(_tag, lambda loader, node, c=_convert: c(loader.construct_scalar(node)))
_Loader.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^$"), [""])  # `key:` with no value


def _yaml_error(e: yaml.YAMLError, where: str) -> str:
    """One line: ``where:line:column: what is wrong``."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    what = ": ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
    return f"{where}{at}: {' '.join(what.split())}"


def loads(text: str, where: str = "<text>") -> Any:
    """YAML text -> Python values by the rule above; a syntax error is one line ``where:line:col: problem``."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as e:
        raise SystemExit(f"{_yaml_error(e, where)}. Fix the YAML; nothing was run.") from None


def load_yaml(path: str | Path) -> Any:
    """A YAML file by the rule above; a syntax error names the file, line and column in one line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SystemExit(f"Cannot read {path}: {e.strerror or e}.") from None
    return loads(text, where=str(path))


def parse_value(text: str, where: str = "-p") -> Any:
    """One ``-p`` value: a flow list / mapping / quoted string is read as YAML, a plain word by the scalar rule,
    anything else (``Pruning: x``, ``# 1``, the empty string) is the text itself."""
    word = text.strip()
    if word[:1] in ("[", "{", '"', "'"):
        return loads(word, where=f"{where} {text!r}")
    for _, pattern, convert, _ in _SCALARS:
        if pattern.fullmatch(word):
            return convert(word)
    return text


# --------------------------------------------------------------------------- declared ranges


_NUM = rf"(?:{_FLOAT}|{_INT}|[-+]?inf)"
_INTERVAL = re.compile(rf"in\s*([(\[])\s*({_NUM})\s*,\s*({_NUM})\s*([)\]])")
_COMPARE = re.compile(rf"(>=|<=|>|<)\s*({_NUM})")
_ONE_OF = re.compile(r"one of:\s*([^\s,;:()]+(?:\s*,\s*[^\s,;:()]+)*)")
_OR_NONE = re.compile(r"\s*or None\b")
_LOOKS_LIKE_A_RANGE = re.compile(r"in\s*[(\[]|[<>]|one of\s*:")


def _number(text: str) -> float:
    return float(text.replace("_", "")) if "inf" in text.lower() else parse_value(text)


@dataclass(frozen=True)
class Rule:
    """What a parameter (or each element of a list parameter) allows, as declared in its comment."""

    text: str                      # the declaration as written, e.g. "in (0, 1]"
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    none_ok: bool = False

    def allows(self, x: Any) -> bool:
        if x is None:
            return self.none_ok
        if self.choices:
            return x in self.choices
        if isinstance(x, bool) or not isinstance(x, (int, float)) or (isinstance(x, float) and math.isnan(x)):
            return False
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def describe(self) -> str:
        if self.choices:
            what = "one of " + ", ".join(map(str, self.choices))
        else:
            what = self.text.split(" or None")[0]
        return what + (" or None" if self.none_ok else "")


def parse_rule(comment: str, convert: Callable[[str], Any] = parse_value) -> Rule | None:
    """The range a parameter's comment declares, or None when it declares none (free text only).

    ``convert`` turns the words of ``one of:`` into values of the parameter's type. A comment that starts
    like a range but is not one raises ``ValueError`` (a typo must not silently declare nothing)."""
    c = comment.strip()
    rule = None
    if m := _INTERVAL.match(c):
        lo, hi = _number(m[2]), _number(m[3])
        if not lo <= hi:
            raise ValueError(f"the interval {m[0]!r} is empty")
        rule = Rule(m[0], low=lo, high=hi, low_open=m[1] == "(", high_open=m[4] == ")")
    elif m := _COMPARE.match(c):
        op, x = m[1], _number(m[2])
        rule = (Rule(m[0], low=x, low_open=op == ">") if op.startswith(">")
                else Rule(m[0], high=x, high_open=op == "<"))
    elif m := _ONE_OF.match(c):
        rule = Rule(m[0], choices=tuple(convert(w.strip().strip("'\"")) for w in m[1].split(",")))
    elif _LOOKS_LIKE_A_RANGE.match(c):
        raise ValueError(f"the comment {c!r} starts like a range but is not one; write e.g. 'in (0, 1]', "
                         "'>= 1' or 'one of: a, b', then free text")
    if rule is None:
        return None
    if m2 := _OR_NONE.match(c, len(rule.text)):
        rule = Rule(**{**rule.__dict__, "text": rule.text + m2[0], "none_ok": True})
    return rule


# --------------------------------------------------------------------------- types from the default


def _kind(x: Any) -> str:
    if x is None:
        return "None"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", tuple: "list",
            dict: "mapping"}.get(type(x), type(x).__name__)


_NAMES = {"bool": "true or false", "int": "an int", "float": "a number", "str": "a string", "list": "a list",
          "mapping": "a mapping", "None": "None"}


class _Refused(Exception):
    """A value does not fit; the message says what would (the caller adds the parameter and the source)."""


@dataclass(frozen=True)
class Parameter:
    """One parameter of a notebook's ``parameters`` cell: its default (a literal) and its declared range."""

    name: str
    default: Any
    rule: Rule | None = None
    literal: bool = True  # False: the default is an expression (its type is unknown, anything is taken)
    comment: str = ""     # the comment on its line(s), the declared range first

    def allowed(self) -> str:
        """What this parameter takes, in words: 'an int >= 1', 'a list, every element a number in [0, 1)'."""
        d = self.default
        rule = f" {self.rule.describe()}" if self.rule else ""
        if not self.literal or d is None:
            return f"None or a value{rule}" if rule else "anything"
        if isinstance(d, (list, tuple)):
            kinds = sorted({_kind(x) for x in d})
            elem = " or ".join(_NAMES.get(k, k) for k in kinds) if kinds else "anything"
            return f"a list, every element {elem}{rule}"
        return f"{_NAMES.get(_kind(d), _kind(d))}{rule}"

    def check(self, value: Any) -> Any:
        """``value`` converted to the parameter's type (ints to floats where the default is a float), or
        ``_Refused``."""
        if not self.literal:
            return value
        if value is None:
            if self.default is None or (self.rule is not None and self.rule.none_ok):
                return None
            raise _Refused("None is not allowed")
        out = _conform(value, self.default)
        if self.rule is not None:
            if isinstance(self.default, (list, tuple)):
                for x in _leaves(out):
                    if not self.rule.allows(x):
                        raise _Refused(f"element {x!r} is not {self.rule.describe()}")
            elif not self.rule.allows(out):
                raise _Refused("")
        return out


def _conform(value: Any, template: Any) -> Any:
    """``value`` in the type of ``template`` (a default): the same kind, an int where a float is (made a float),
    a list whose elements each have a kind of the template's elements; else ``_Refused``."""
    if template is None:
        return value
    want, got = _kind(template), _kind(value)
    if want == got == "list":
        kinds = {_kind(t): t for t in template}
        if not kinds:
            return list(value)
        out = []
        for x in value:
            k = _kind(x)
            if k == "list" and "list" in kinds:
                out.append(_conform(x, kinds["list"]))
            elif k in kinds:
                out.append(x)
            elif k == "int" and "float" in kinds:
                out.append(float(x))
            else:
                raise _Refused(f"element {x!r} is {_NAMES.get(k, k)}")
        return out
    if want == got:
        return value
    if want == "float" and got == "int":
        return float(value)
    raise _Refused("")


def _leaves(x: Any):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _leaves(y)
    else:
        yield x


def _element_converter(default: Any) -> Callable[[str], Any]:
    """How the words of ``one of:`` become values: by the type of the default (or of its elements)."""
    kinds = {_kind(x) for x in _leaves(default)} if isinstance(default, (list, tuple)) else {_kind(default)}
    if kinds == {"str"}:
        return str
    if kinds <= {"int"} and kinds:
        return lambda w: int(w)
    if kinds <= {"int", "float"} and kinds:
        return lambda w: float(w)
    return parse_value


def parameters_cell(nb: str | Path) -> str:
    """The source of a notebook's cell tagged ``parameters`` ("" when it has none)."""
    cells = json.loads(Path(nb).read_text(encoding="utf-8")).get("cells", [])
    for c in cells:
        if c.get("cell_type") == "code" and "parameters" in c.get("metadata", {}).get("tags", []):
            src = c.get("source", "")
            return "".join(src) if isinstance(src, list) else src
    return ""


def declared(nb: str | Path) -> dict[str, Parameter]:
    """The parameters of a notebook's ``parameters`` cell, with their defaults and declared ranges.

    Read with Python's own parser (papermill's reader drops every line with a second ``=``, e.g. ``# >= 1``):
    each top-level assignment to a name is a parameter; its comment is the first one on its lines."""
    src = parameters_cell(nb)
    try:
        tree = ast.parse(src)
        comments = [(t.start[0], t.string.lstrip("#").strip()) for t in
                    tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT]
    except (SyntaxError, tokenize.TokenError) as e:
        raise ValueError(f"{Path(nb).name}: its parameters cell is not valid Python ({e})") from None
    out = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else getattr(node, "target", None)
        if not isinstance(node, (ast.Assign, ast.AnnAssign)) or not isinstance(target, ast.Name) or node.value is None:
            continue
        name = target.id
        try:
            default, literal = ast.literal_eval(node.value), True
        except ValueError:
            default, literal = ast.get_source_segment(src, node.value), False
        comment = next((text for line, text in comments if node.lineno <= line <= node.end_lineno), "")
        try:
            rule = parse_rule(comment, _element_converter(default) if literal else parse_value)
        except ValueError as e:
            raise ValueError(f"{Path(nb).name}: parameter {name}: {e}") from None
        out[name] = Parameter(name, default, rule, literal, comment)
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check(nb: str | Path, values: dict, source: str, parameters: dict[str, Parameter] | None = None) -> dict:
    """``values`` (from ``source``: a file name, ``-p``, ...) checked against the notebook's parameters and
    converted to their types; raises ``SystemExit`` with one line at the first value that does not fit."""
    name = Path(nb).name
    parameters = declared(nb) if parameters is None else parameters
    unknown = sorted(set(values) - set(parameters))
    if unknown:
        raise SystemExit(f"{source}: {name} has no parameter named {', '.join(map(repr, unknown))}. "
                         f"Its parameters are: {', '.join(sorted(parameters))}.")
    out = {}
    for key, value in values.items():
        p = parameters[key]
        try:
            out[key] = p.check(value)
        except _Refused as e:
            why = f" ({e})" if str(e) else ""
            raise SystemExit(f"{source}: {key}={_show(value)} is not allowed; {name} takes {p.allowed()} for "
                             f"{key}{why}.") from None
    return out


def resolve(nb: str | Path, *layers: tuple[str, dict]) -> dict:
    """Merge ``(source, values)`` layers in order (a base file, then ``-p`` or a sweep's grid), each checked
    and converted; the later layer wins. Nothing is run: call it before any kernel starts."""
    parameters = declared(nb)
    out: dict = {}
    for source, values in layers:
        out.update(check(nb, values or {}, source, parameters))
    return out


def defaults(nb: str | Path) -> dict:
    """The parameters' default values (an expression default as its source text)."""
    return {k: p.default for k, p in declared(nb).items()}
