"""The web edition: the committed, executed notebooks rendered to static HTML with nbconvert.

``python -m pruning_lab book`` (or ``./lab book``) writes ``build/book/``: ``index.html`` (the
chapter map from the README, each chapter's status and its key results read from ``results/*.json``)
and one page per notebook, figures embedded, code cells folded into ``<details>``, links to the
previous and next chapter. The pages need no Python and no network (no MathJax or require.js from a
CDN), and read on a phone (the template's viewport plus a narrow-screen stylesheet).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .stats import verdict_words

TEMPLATES = Path(__file__).parent / "templates"


@dataclass
class BookResult:
    """What a build wrote and what it could not render (notebook, cell, error)."""

    out: Path
    pages: list[Path] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def chapter_map(readme: Path) -> dict[str, tuple[str, str]]:
    """``{stem: (papers, status)}`` from the README's chapter table (rows ``| `stem` | papers | status |``)."""
    rows = {}
    for line in readme.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*`(\d\d_\w+)`\s*\|(.*)\|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = (m.group(2).strip(), m.group(3).strip())
    return rows


def key_results(stem: str, r: dict) -> list[str]:
    """A few headline numbers of one chapter's recorded run, as Markdown bullet texts."""
    pct = "{:.1%}".format
    if stem.startswith("00"):
        m = r["setup"]["model"]
        return [f"set-up checked: {m['class']}, {m['parameters'] / 1e6:.0f}M parameters, torch {r['setup']['torch']}"]
    if stem.startswith("01"):
        top = r["accuracy_vs_sparsity"]["global"][-1]
        out = [f"dense LeNet-300-100: {pct(r['dense_accuracy'])} test accuracy (mean of "
               f"{len(r['dense_accuracy_per_seed'])} seeds)",
               f"global magnitude at {pct(top['sparsity'])} sparsity: {pct(top['accuracy'])} after fine-tuning"]
        if r.get("dense_perplexity"):
            half = [p for p in r["llm_perplexity_vs_sparsity"]["global"] if p["sparsity"] == 0.5]
            out.append(f"SmolLM2 perplexity {r['dense_perplexity']:.1f} dense"
                       + (f", {half[0]['perplexity']:.1f} at 50% global magnitude" if half else ""))
        return out
    if stem.startswith("02"):
        last = r["levels"][-1]
        d = r["paired"]["ticket − re-init"][-1]
        return [f"dense: {pct(r['dense_accuracy'])}; winning ticket at {pct(last['weights_remaining'])} of the weights: "
                f"{pct(last['ticket_accuracy'])}",
                f"ticket − random re-init there: {100 * d['mean_difference']:+.2f} ± {100 * d['std_difference']:.2f} "
                f"points over {d['n']} seeds ({verdict_words(d, 'ticket better', 're-init better', too_few='too few pairs')})"]
    if stem.startswith("03"):
        out = [f"dense perplexity {r['dense']['perplexity']:.1f} ({r['convention'].split(';')[0]})"]
        for p in r["flap_standardize"]["paired"]["adaptive-channels vs uniform"]:
            out.append(f"FLAP adaptive vs uniform at {p['ratio']:.0%} removed: perplexity ×{p['value_ratio']:.2f} "
                       f"({verdict_words(p, 'adaptive better', 'uniform better', too_few='too few pairs')}, "
                       f"{p['n']} seeds)")
        return out
    if stem.startswith("04"):
        out = [f"full cache: {pct(r['full']['retrieval_accuracy'])} of the retrieval items"]
        for b in r["params"]["budgets"]:
            rows = {x["policy"]: x for x in r["runs"] if x["moment"] == "prompt" and x["budget"] == b}
            papers = [x for name, x in rows.items() if name not in ("recency", "random", "oracle")
                      and x["accuracy_outside"] is not None]
            if papers and "recency" in rows:
                best = max(papers, key=lambda x: x["accuracy_outside"])
                out.append(f"prompt compression to {b} tokens, facts outside the recency window: best {best['policy']} "
                           f"{best['accuracy_outside']:.0%}, recency {rows['recency']['accuracy_outside']:.0%}")
        return out
    if stem.startswith("05"):
        rz, d = r["reasoner"], r["distill"]
        return [f"the small reasoner: {rz['cot_accuracy']:.0%} of {rz['n']} held-out problems with a CoT, "
                f"{rz['answer_accuracy']:.0%} answering directly (the embedded model: {r['base']['cot_accuracy']:.0%})",
                "students distilled on its pruned CoTs: " + ", ".join(
                    f"{k} {d['accuracy'][k]:.0%} at {d['mean_cot_tokens'][k]:.0f} tokens" for k in d["accuracy"])]
    return []


WIDGET = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = ("*An interactive explorer: it needs a running kernel. Open this chapter in JupyterLab "
               "(`./lab lab`), run it, and drag its slider.*")


def _for_the_page(nb) -> None:
    """Markdown links to sibling notebooks (``02_lottery_tickets.ipynb``) point at their pages, and a widget's
    output (its state is not committed, so a page could only show its text repr) says where it works."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = re.sub(r"\b(\d\d_\w+)\.ipynb\b", r"\1.html", cell.source)
        for out in cell.get("outputs", []):
            if WIDGET in out.get("data", {}):
                out["data"] = {"text/markdown": WIDGET_NOTE}


def _failing_cell(exporter, nb, resources) -> str:
    """The first cell that fails to render on its own (to name it in the build's report)."""
    import copy

    for i, cell in enumerate(nb.cells):
        one = copy.deepcopy(nb)
        one.cells = [cell]
        try:
            exporter.from_notebook_node(one, resources=dict(resources))
        except Exception as e:  # noqa: BLE001 - the report names whatever went wrong
            return f"cell {i} (id {cell.get('id', '?')}, {cell.cell_type}): {type(e).__name__}: {e}"
    return "no single cell fails alone"


def build(notebooks: list[Path], results: Path, readme: Path, out: Path) -> BookResult:
    """Render ``notebooks`` (executed .ipynb files, in chapter order) and an index into ``out``.

    A notebook that fails to render is named with its failing cell in ``BookResult.failures``; the
    others are still written. ``out`` is replaced as a whole only when the build finishes.
    """
    import nbformat
    from nbconvert import HTMLExporter

    t0 = time.perf_counter()
    out = Path(out)
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    exporter = HTMLExporter(extra_template_basedirs=[str(TEMPLATES)], template_name="book")
    chapters = chapter_map(readme)
    stems = [nb.stem for nb in notebooks]
    result = BookResult(out=out)
    rows = []
    for i, path in enumerate(notebooks):
        stem = path.stem
        nav = {"index": "index.html",
               "prev": f"{stems[i - 1]}.html" if i > 0 else None,
               "next": f"{stems[i + 1]}.html" if i + 1 < len(stems) else None}
        resources = {"book": nav, "metadata": {"name": stem.replace("_", " ")}}
        try:
            nb = nbformat.read(path, as_version=4)
        except Exception as e:  # noqa: BLE001
            result.failures.append(f"{path}: not a readable notebook: {type(e).__name__}: {e}")
            continue
        title = next((c.source.splitlines()[0].lstrip("# ").strip() for c in nb.cells
                      if c.cell_type == "markdown" and c.source.startswith("#")), stem)
        _for_the_page(nb)
        try:
            html, _ = exporter.from_notebook_node(nb, resources=resources)
        except Exception:  # noqa: BLE001 - name the cell, keep building the rest
            result.failures.append(f"{path}: {_failing_cell(exporter, nb, resources)}")
            continue
        page = tmp / f"{stem}.html"
        page.write_text(html, encoding="utf-8")
        result.pages.append(out / page.name)
        rfile = results / f"{stem}.json"
        try:
            key = key_results(stem, json.loads(rfile.read_text(encoding="utf-8"))) if rfile.is_file() else []
        except (KeyError, IndexError, TypeError, ValueError) as e:
            key = [f"(results/{stem}.json does not have the expected fields: {type(e).__name__} {e})"]
        papers, status = chapters.get(stem, ("", "—"))
        rows.append((stem, title, papers, status, key, rfile.is_file()))

    index = nbformat.v4.new_notebook()
    lines = ["# pruning_lab — the web edition",
             "",
             "The workbook's notebooks as they ran for the committed results: every figure, table and conclusion, "
             "no Python needed. To run them yourself: `./lab lab` (JupyterLab) or `./lab workbook`.",
             "",
             "| chapter | papers | status |", "|---|---|---|"]
    lines += [f"| [{title}]({stem}.html) | {papers} | {status} |" for stem, title, papers, status, _, _ in rows]
    lines += ["", "## Key results of the committed runs", ""]
    for stem, title, _, _, key, recorded in rows:
        lines.append(f"**[{title}]({stem}.html)**" + ("" if recorded else " — no results recorded"))
        lines.append("")
        lines += [f"- {k}" for k in key] + [""]
    if result.failures:
        lines += ["## Not rendered", ""] + [f"- `{f}`" for f in result.failures]
    index.cells = [nbformat.v4.new_markdown_cell("\n".join(lines))]
    html, _ = exporter.from_notebook_node(index, resources={"book": {"index": None}, "metadata": {"name": "pruning_lab"}})
    (tmp / "index.html").write_text(html, encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    result.pages.insert(0, out / "index.html")
    result.seconds = time.perf_counter() - t0
    return result
