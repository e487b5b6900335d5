"""JupyterLab as a student meets it, in Debian's Chromium: open a notebook, see the workbook's kernel,
run every cell, find no error, and drag each chapter's slider until its plot is redrawn."""

from __future__ import annotations

import re
import time

import nbformat
import pytest

from notebook_helpers import keep_smoke_run

from pruning_lab import workbook

NOTEBOOK = ".jp-NotebookPanel:not(.lm-mod-hidden)"
# every code cell numbered, or (after an error stopped the run) none queued and at least one numbered
DONE = """() => {
  const p = [...document.querySelectorAll('%s .jp-CodeCell .jp-InputPrompt')].map(e => e.textContent);
  const numbered = p.filter(t => /\\[\\d+\\]/.test(t)).length;
  return p.length > 0 && (numbered === p.length || (numbered > 0 && !p.some(t => t.includes('*'))));
}""" % NOTEBOOK


def open_notebook(page, lab, name, shots):
    from playwright.sync_api import expect

    with shots.step(page, f"open {name}"):
        page.goto(lab.open_url(name))
        kernel = page.locator(f"{NOTEBOOK} .jp-Toolbar-kernelName").first
        expect(kernel).to_have_text(workbook.KERNEL_DISPLAY, timeout=90_000)
        page.locator(f"{NOTEBOOK} .jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(timeout=90_000)
    shots(page, f"{name}_opened")


def menu(page, top: str, item: str):
    """Click a menu of the menu bar, then one of its items, by their labels (as a student would)."""
    page.locator(".lm-MenuBar-item", has_text=re.compile(f"^{top}$")).first.click()
    label = page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$"))
    page.locator(".lm-Menu-item", has=label).first.click()


# the notebook's tab shows no unsaved changes
SAVED = "() => document.querySelectorAll('.lm-DockPanel-tabBar .lm-TabBar-tab.jp-mod-dirty').length === 0"


def run_all_and_save(page, lab, name, shots, timeout_s: float) -> nbformat.NotebookNode:
    """Run > Run All Cells, wait until the kernel is done, File > Save, wait for *that* save (the server wrote
    the file after the click and the document is no longer dirty; autosave is off); return the saved notebook."""
    path = lab.root / name
    with shots.step(page, f"run all cells of {name}"):
        menu(page, "Run", "Run All Cells")
        page.wait_for_function(DONE, timeout=timeout_s * 1000, polling=500)
        page.locator(f"{NOTEBOOK} .jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(timeout=60_000)
    shots(page, f"{name}_ran")
    with shots.step(page, f"save {name}"):
        before = lab.last_modified(name)
        menu(page, "File", "Save Notebook")
        deadline = time.monotonic() + 60
        while lab.last_modified(name) == before and time.monotonic() < deadline:
            time.sleep(0.3)
        assert lab.last_modified(name) != before, "File > Save did not write the notebook within 60 s"
        page.wait_for_function(SAVED, timeout=60_000, polling=300)
    nb = nbformat.read(path, as_version=4)
    errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    unrun = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip() and not c.execution_count]
    assert not errors and not unrun, (f"{name} in JupyterLab: error outputs {errors}, cells not run {unrun}; "
                                      f"screenshots in {shots.folder}")
    return nb


def test_welcome_runs_on_the_workbook_kernel(jupyterlab, browser, shots):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        open_notebook(page, jupyterlab, "00_welcome.ipynb", shots)
        run_all_and_save(page, jupyterlab, "00_welcome.ipynb", shots, timeout_s=400)
    finally:
        page.close()
        jupyterlab.shutdown_kernels()


def prepare_smoke_copy(lab, stem: str) -> str:
    """The chapter with its smoke parameters injected (papermill, not executed), in the server's folder."""
    import papermill

    src = workbook.find_notebook(stem)
    values, _ = workbook.resolve_parameters(src, "smoke")
    papermill.execute_notebook(str(src), str(lab.root / src.name), parameters=values, prepare_only=True,
                               kernel_name=workbook.KERNEL_NAME, progress_bar=False)
    return src.name


def drag(page, slider, fraction: float | None = None):
    """Drag the slider's handle to ``fraction`` of its track, as a hand on a mouse would; by default to the far
    end from where the handle stands (a chapter may start its slider at either end)."""
    track = slider.locator(".noUi-target, .noUi-base").first.bounding_box()
    handle = slider.locator(".noUi-handle").first.bounding_box()
    if fraction is None:
        at = (handle["x"] + handle["width"] / 2 - track["x"]) / track["width"]
        fraction = 0.95 if at < 0.5 else 0.05
    page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
    page.mouse.down()
    page.mouse.move(track["x"] + fraction * track["width"], track["y"] + track["height"] / 2, steps=8)
    page.mouse.up()


@pytest.mark.parametrize("stem", ["01_global_magnitude", "02_lottery_tickets", "03_structured_llm", "04_kv_eviction",
                                  "05_cot_pruning"])
def test_chapter_widget_redraws_its_output(stem, jupyterlab, browser, shots, tmp_path):
    """Run the chapter (smoke parameters) in JupyterLab, drag the slider of its explorer, see the output change:
    a figure's image bytes (chapters 1-4) or the rendered trace (chapter 5)."""
    from playwright.sync_api import expect

    name = prepare_smoke_copy(jupyterlab, stem)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        open_notebook(page, jupyterlab, name, shots)
        run_all_and_save(page, jupyterlab, name, shots, timeout_s=900)
        # the smoke tests (tests/test_*.py) read this run instead of running the chapter a second time
        keep_smoke_run(stem, jupyterlab.root / name, jupyterlab.root.parent / "results", tmp_path / "smoke")
        box = page.locator(f"{NOTEBOOK} .widget-interact", has=page.locator(".widget-slider")).last
        out = box.locator(".widget-output").last
        with shots.step(page, f"find the widget of {stem}"):
            box.scroll_into_view_if_needed(timeout=30_000)
            expect(box.locator(".widget-slider .noUi-handle").first).to_be_visible(timeout=30_000)
            texts = page.locator(f"{NOTEBOOK} .jp-OutputArea").all_inner_texts()
            placeholders = [t for t in texts if "Loading widget" in t or "Slider(" in t]
            assert not placeholders, "a widget is shown as a placeholder or as its text repr, not rendered"
            expect(out.locator(".jp-OutputArea-output").first).to_be_visible(timeout=30_000)  # a figure or HTML
            images = out.locator("img")
            before = images.last.get_attribute("src") if images.count() else out.inner_html()
        shots(page, f"{stem}_widget_before")
        with shots.step(page, f"drag the slider of {stem}"):
            drag(page, box.locator(".widget-slider").first)
            page.wait_for_function("([el, old]) => { const i = el.querySelectorAll('img'); "
                                   "const now = i.length ? i[i.length - 1].src : el.innerHTML; return now !== old; }",
                                   arg=[out.element_handle(), before], timeout=90_000, polling=300)
            # the drag may pass through several values: let the kernel draw the last one
            page.locator(f"{NOTEBOOK} .jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(timeout=60_000)
        shots(page, f"{stem}_widget_after")
        after = images.last.get_attribute("src") if images.count() else out.inner_html()
        assert after != before and (not images.count() or after.startswith("data:image/png;base64,"))
    finally:
        page.close()
        jupyterlab.shutdown_kernels()
