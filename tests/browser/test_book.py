"""The web edition in Chromium: the index and a chapter on a desktop and a phone-sized screen, every image
loaded, every link resolved; and a notebook that cannot be rendered is named while the rest is built."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from pruning_lab import book, workbook

PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}
DESKTOP = {"viewport": {"width": 1280, "height": 900}}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("book") / "book"
    res = book.build(workbook.notebooks(), workbook.ROOT / "results", workbook.ROOT / "README.md", out)
    assert not res.failures, res.failures
    return res


def test_the_book_builds_every_chapter_within_a_minute(built):
    assert built.seconds < 60, f"the web edition took {built.seconds:.0f} s"
    assert [p.name for p in built.pages] == ["index.html"] + [f"{nb.stem}.html" for nb in workbook.notebooks()]
    page = (built.out / "01_global_magnitude.html").read_text()
    assert "<details class=\"book-code\">" in page and "data:image/png;base64," in page
    assert "cdnjs" not in page and "mathjax" not in page.lower()  # nothing to fetch: it reads offline
    assert "interactive(children=" not in page and "An interactive explorer: it needs a running kernel" in page
    index = (built.out / "index.html").read_text()
    for stem in (nb.stem for nb in workbook.notebooks()):
        assert f'href="{stem}.html"' in index
    assert "done" in index and "Key results" in index
    # the key results are the committed runs' numbers
    r3 = json.loads((workbook.ROOT / "results" / "03_structured_llm.json").read_text())
    r4 = json.loads((workbook.ROOT / "results" / "04_kv_eviction.json").read_text())
    assert f"dense perplexity {r3['dense']['perplexity']:.1f}" in index
    assert f"full cache: {r4['full']['retrieval_accuracy']:.1%} of the retrieval items" in index


def check_page(page, url: str, shots, name: str):
    """Every image decoded, every relative link a file of the book, no page-wide sideways scrolling."""
    with shots.step(page, name):
        page.goto(url)
        page.wait_for_load_state("load")
        broken = page.evaluate("() => [...document.images].filter(i => !(i.complete && i.naturalWidth > 0))"
                               ".map(i => i.src.slice(0, 80))")
        assert not broken, f"images that did not load: {broken}"
        links = page.evaluate("() => [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href'))")
        here = Path(url.removeprefix("file://")).parent
        missing = [h for h in links if not h.startswith(("http:", "https:", "#", "mailto:"))
                   and not (here / h.split("#")[0]).is_file()]
        assert not missing, f"links that lead nowhere: {missing}"
        overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"the page is {overflow}px wider than the screen"
    shots(page, name)
    return links


@pytest.mark.parametrize("device", ["desktop", "phone"])
def test_index_and_a_chapter_read_in_chromium(device, built, browser, shots):
    ctx = browser.new_context(**(PHONE if device == "phone" else DESKTOP))
    page = ctx.new_page()
    try:
        links = check_page(page, (built.out / "index.html").as_uri(), shots, f"{device}_index")
        assert "03_structured_llm.html" in links
        links = check_page(page, (built.out / "03_structured_llm.html").as_uri(), shots, f"{device}_chapter_03")
        assert {"index.html", "02_lottery_tickets.html", "04_kv_eviction.html"} <= set(links)
        n_images = page.evaluate("() => document.images.length")
        assert n_images >= 5, f"chapter 3 shows {n_images} figures"
        with shots.step(page, f"{device}: unfold a code cell"):
            first = page.locator("details.book-code").first
            first.locator("summary").click()
            assert first.evaluate("d => d.open")
        shots(page, f"{device}_code_unfolded")
    finally:
        ctx.close()


def test_a_notebook_that_cannot_render_is_named_and_the_rest_is_built(tmp_path):
    good = workbook.notebooks()[0]
    bad = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x = 1")
    cell.outputs = [nbformat.v4.new_output("display_data", data={"text/markdown": "**ok**"})]
    cell.outputs[0]["data"]["text/markdown"] = 12345  # a damaged file: not text, the template cannot render it
    bad.cells = [nbformat.v4.new_markdown_cell("# broken"), cell]
    bad_path = tmp_path / "07_broken.ipynb"
    bad_path.write_text(json.dumps(bad))  # written as JSON: nbformat would refuse to write it
    res = book.build([good, bad_path], workbook.ROOT / "results", workbook.ROOT / "README.md", tmp_path / "book")
    assert len(res.failures) == 1 and "07_broken.ipynb" in res.failures[0] and "cell 1" in res.failures[0], res.failures
    assert (tmp_path / "book" / f"{good.stem}.html").is_file() and (tmp_path / "book" / "index.html").is_file()
    assert not (tmp_path / "book" / "07_broken.html").exists()
    assert "Not rendered" in (tmp_path / "book" / "index.html").read_text()
