"""The workbook in a real browser: JupyterLab as `make lab` starts it, notebooks run through its UI in Chromium.

Run it with ``make e2e`` (installs Playwright from PyPI into .venv and Debian's ``chromium`` with apt-get when it
is missing, then runs ``LORABOOK_E2E=1 pytest tests/e2e``); ``make test`` / ``pytest tests`` leave it out.
Screenshots go to tests/e2e/screenshots/ (gitignored; ``E2E_SCREENSHOTS=DIR`` puts them elsewhere), and the
test prints their paths.

Each notebook is opened in JupyterLab, its outputs cleared with Edit → Clear Outputs of All Cells and all cells run
with Run → Run All Cells (the menus, clicked); the test waits until every code cell has run and the kernel is
idle, then checks what the page shows: no traceback, no "Error displaying widget", no widget left as its text
repr (``VBox(children=...)``). Notebook 00: SmolLM2's answer names Paris, and the chat widget answers a click.
Notebook 01: the memory calculator is live ipywidgets, and dragging its batch slider redraws the plot.
A control notebook with a broken widget, a widget left as text and an exception proves the checks see all three.
"""
from __future__ import annotations

import base64
import re
import time
from pathlib import Path

import nbformat

RUN_ALL_TIMEOUT = {"00_welcome.ipynb": 900, "01_memory_accounting.ipynb": 1500, "e2e_control.ipynb": 180}
# The text JupyterLab shows for a widget it cannot render, and the start of a widget's text repr (what a front end
# without the widget manager shows instead of the widget).
WIDGET_ERROR = "Error displaying widget"
WIDGET_REPR = re.compile(r"^\s*(VBox|HBox|Box|interactive|Output|IntSlider|Dropdown|Button|Text|IntProgress|"
                         r"FloatProgress|HTML)\((children|value|description|layout|outputs|msg_id)=", re.M)


# ---- driving JupyterLab ----------------------------------------------------------------------------------------

def open_notebook(page, lab, name: str) -> None:
    """Open a notebook in a fresh workspace and wait for its kernel."""
    page.goto(f"{lab.url}/lab/tree/{name}?reset&token={lab.token}", wait_until="domcontentloaded",
              timeout=120_000)
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", timeout=120_000)
    wait_until(page, "the kernel to start", lambda s: s["kernel"] == "idle", timeout=180)


def menu(page, menu_name: str, item: str) -> None:
    """Click a menu of the menu bar, then its item labelled `item`, as a student would."""
    page.locator(".lm-MenuBar-item", has_text=re.compile(rf"^{menu_name}$")).click()
    label = page.locator(".lm-Menu-itemLabel").get_by_text(item, exact=True)
    page.locator(".lm-MenuBar-menu .lm-Menu-item:not(.lm-mod-hidden)", has=label).click()


# What the page shows about the current notebook: kernel status, how many code cells have run, busy prompts,
# and the notebook's model (cells with outputs, as nbformat JSON) — read through window.jupyterapp.
STATE_JS = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.context || !panel.sessionContext) return null;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const nb = panel.context.model.toJSON();
  const code = nb.cells.filter(c => c.cell_type === 'code');
  const prompts = [...panel.node.querySelectorAll('.jp-InputArea-prompt')].map(e => e.textContent);
  const indicator = panel.node.querySelector('.jp-Notebook-ExecutionIndicator');
  return {kernel: kernel ? kernel.status : null, indicator: indicator ? indicator.dataset.status : null,
          path: panel.context.path, n_code: code.length,
          n_run: code.filter(c => c.execution_count !== null).length,
          n_busy: prompts.filter(p => p.includes('*')).length,
          errors: code.filter(c => (c.outputs || []).some(o => o.output_type === 'error')).length};
}"""


def state(page) -> dict | None:
    return page.evaluate(STATE_JS)


def wait_until(page, what: str, done, timeout: float, poll: float = 1.0) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = state(page)
        if last is not None and done(last):
            return last
        page.wait_for_timeout(poll * 1000)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last state {last}")


def run_all(page, name: str) -> float:
    """Edit → Clear Outputs of All Cells, Run → Run All Cells; wait until every code cell has run (or one raised)
    and the kernel is idle. Returns the seconds it took."""
    menu(page, "Edit", "Clear Outputs of All Cells")
    cleared = wait_until(page, "the outputs to clear", lambda s: s["n_run"] == 0, timeout=30)
    assert cleared["path"] == name, cleared
    t0 = time.monotonic()
    menu(page, "Run", "Run All Cells")
    finished = wait_until(
        page, f"Run All Cells of {name}",
        lambda s: (s["n_run"] == s["n_code"] or s["errors"] > 0) and s["n_busy"] == 0 and s["kernel"] == "idle",
        timeout=RUN_ALL_TIMEOUT[name], poll=2.0)
    seconds = time.monotonic() - t0
    print(f"\n{name}: {finished['n_run']}/{finished['n_code']} code cells run through the UI in {seconds:.0f} s "
          f"(kernel {finished['kernel']}, toolbar indicator {finished['indicator']})")
    return seconds


def cells(page):
    return page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell")


def cell_index(path: Path, pattern: str) -> int:
    """The index of the one code cell whose source matches the regular expression `pattern` (cells as saved)."""
    nb = nbformat.read(path, as_version=4)
    hits = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and re.search(pattern, c.source)]
    assert len(hits) == 1, f"{path.name}: {len(hits)} code cells match {pattern!r}"
    return hits[0]


LOADING_JS = """() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output')]
  .filter(e => e.textContent.trim().startsWith('Loading widget')).length"""


def settle(page, timeout: float = 180) -> int:
    """Wait until no widget output still says "Loading widget..." (a widget view is created asynchronously, and
    one whose model is missing turns into "Error displaying widget" only after a while). Returns how many are left."""
    deadline = time.monotonic() + timeout
    while (left := page.evaluate(LOADING_JS)) and time.monotonic() < deadline:
        page.wait_for_timeout(500)
    return left


def problems(page) -> list[str]:
    """Everything on the page that a student would read as broken, cell by cell."""
    found = [] if not (left := settle(page)) else [f"{left} widget outputs still say 'Loading widget...'"]
    model = page.evaluate("() => window.jupyterapp.shell.currentWidget.context.model.toJSON()")
    for i, c in enumerate(model["cells"]):
        for o in c.get("outputs", []):
            if o["output_type"] == "error":
                found.append(f"cell {i}: {o['ename']}: {o['evalue']}")
    all_cells = cells(page)
    for i in range(all_cells.count()):
        outputs = all_cells.nth(i).locator(".jp-OutputArea-output")
        for j in range(outputs.count()):
            text = text_of(outputs.nth(j))
            if "Traceback (most recent call last)" in text:
                found.append(f"cell {i}: shows a traceback: {text.strip().splitlines()[-1][:200]}")
            if WIDGET_ERROR in text or "Javascript Error" in text:
                found.append(f"cell {i}: {text.strip()[:200]}")
            elif WIDGET_REPR.search(text):
                found.append(f"cell {i}: a widget shown as its text repr: {text.strip()[:120]}")
    return found


def text_of(locator) -> str:
    """The element's text from the DOM (textContent): JupyterLab skips rendering cells outside the viewport
    (content-visibility), and innerText of a skipped element is empty."""
    return locator.text_content(timeout=60_000) or ""


def wait_for_text(locator, what: str, timeout: float = 120) -> str:
    """The element's text once it has any (outputs can arrive just after the cell's execution count)."""
    deadline = time.monotonic() + timeout
    while not (text := text_of(locator)).strip() and time.monotonic() < deadline:
        locator.page.wait_for_timeout(500)
    return text


def shot(target, screenshots: Path, name: str) -> Path:
    path = screenshots / name
    target.screenshot(path=str(path), timeout=60_000)
    print(f"screenshot: {path}")
    return path


def plot_src(cell) -> str | None:
    """The data: URL of the plot in a cell's output, None while there is none."""
    img = cell.locator(".jp-OutputArea-output img")
    return img.first.get_attribute("src") if img.count() else None


# ---- the tests --------------------------------------------------------------------------------------------------

def test_checks_see_a_broken_widget_and_an_exception(page, lab, screenshots):
    """The control: a widget output whose model does not exist, a widget left as its text repr, then an exception.
    `problems` must report all three, else the notebooks' empty reports below would prove nothing."""
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell(
                    "from IPython.display import display\n"
                    "display({'application/vnd.jupyter.widget-view+json': {'model_id': 'f' * 32, "
                    "'version_major': 2, 'version_minor': 0}, 'text/plain': 'VBox(children=())'}, raw=True)\n"
                    "display({'text/plain': 'interactive(children=(IntSlider(value=1),))'}, raw=True)"),
                nbformat.v4.new_code_cell("1 / 0"),
                nbformat.v4.new_code_cell("print('not reached')")]
    nbformat.write(nb, lab.root / "e2e_control.ipynb")
    open_notebook(page, lab, "e2e_control.ipynb")
    run_all(page, "e2e_control.ipynb")
    found = problems(page)
    shot(page, screenshots, "control_errors.png")
    assert any(f.startswith("cell 0:") and WIDGET_ERROR in f for f in found), found
    assert any(f.startswith("cell 0: a widget shown as its text repr: interactive(children=") for f in found), found
    assert "cell 1: ZeroDivisionError: division by zero" in found, found
    assert any(f.startswith("cell 1: shows a traceback") for f in found), found
    assert not any(f.startswith("cell 2") for f in found), found


def run_clean(page, lab, screenshots, name):
    """Open ``name`` in the lab, run all its cells through the menus, screenshot it, and find no problems."""
    open_notebook(page, lab, name)
    run_all(page, name)
    shot(page, screenshots, f"{name.split('_')[0]}_{name.split('_')[1].split('.')[0]}_after_run_all.png")
    assert problems(page) == []


def cell_of(page, lab, name, pattern):
    """The notebook cell whose source matches ``pattern``, scrolled into view."""
    cell = cells(page).nth(cell_index(lab.root / name, pattern))
    cell.scroll_into_view_if_needed()
    return cell


def test_welcome_runs_in_the_browser(page, lab, screenshots):
    name = "00_welcome.ipynb"
    run_clean(page, lab, screenshots, name)
    chat = cell_of(page, lab, name, r"print\(chat\(.*capital of France")
    answer = wait_for_text(chat.locator(".jp-OutputArea-output").first, "the chat answer")
    print(f"chat answer: {answer.strip()!r}")
    assert "Paris" in answer
    shot(chat, screenshots, "00_welcome_chat.png")

    # The chat box is a live widget: a click on its button makes the kernel answer into its Output widget.
    ask = cell_of(page, lab, name, r"\.on_click\(")
    assert ask.locator(".widget-text input").input_value() == "Name a planet with rings."
    ask.locator("button.jupyter-button", has_text="Ask SmolLM2").click()
    reply = ask.locator(".widget-output .jp-OutputArea-output")
    reply.first.wait_for(state="visible", timeout=300_000)
    wait_until(page, "the chat widget's answer", lambda s: s["kernel"] == "idle", timeout=300)
    text = wait_for_text(reply.first, "the chat widget's answer").strip()
    print(f"chat widget answer: {text!r}")
    assert text
    shot(ask, screenshots, "00_welcome_chat_widget.png")
    assert problems(page) == []


def test_memory_calculator_is_live(page, lab, screenshots):
    name = "01_memory_accounting.ipynb"
    run_clean(page, lab, screenshots, name)
    calc = cell_of(page, lab, name, r"memory\.calculator\(\)")
    out = text_of(calc.locator(".jp-OutputArea-output").first)  # the cell's own output (the widgets nest more)
    assert WIDGET_ERROR not in out and not WIDGET_REPR.search(out), out[:300]
    assert calc.locator(".widget-vbox .widget-dropdown select").count() == 4
    assert calc.locator(".widget-checkbox input").count() == 1
    batch = calc.locator(".widget-slider", has=page.locator(".widget-label", has_text=re.compile(r"^batch$")))
    assert batch.count() == 1
    readout = batch.locator(".widget-readout")
    assert text_of(readout).strip() == "1"
    calc.locator(".jp-OutputArea-output img").first.wait_for(state="visible", timeout=120_000)
    before = plot_src(calc)
    assert before and before.startswith("data:image/png;base64,"), before
    table_before = text_of(calc.locator(".widget-output"))
    assert "batch 1 x seq 512" in table_before, table_before
    shots = [shot(calc, screenshots, "01_calculator_before.png")]

    # Drag the batch slider's handle with the mouse, three quarters of the way along its track.
    handle, track = batch.locator(".noUi-handle"), batch.locator(".noUi-target")
    h, t = handle.bounding_box(), track.bounding_box()
    page.mouse.move(h["x"] + h["width"] / 2, h["y"] + h["height"] / 2)
    page.mouse.down()
    page.mouse.move(t["x"] + 0.75 * t["width"], h["y"] + h["height"] / 2, steps=12)
    page.mouse.up()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        value, after = text_of(readout).strip(), plot_src(calc)
        if value != "1" and after and after != before:
            break
        page.wait_for_timeout(500)
    else:
        raise AssertionError(f"the plot did not change after the slider moved (readout {text_of(readout)!r})")
    wait_until(page, "the calculator's redraw", lambda s: s["kernel"] == "idle", timeout=300)
    value, after = text_of(readout).strip(), plot_src(calc)  # the final redraw, once the kernel is idle
    table_after = text_of(calc.locator(".widget-output"))
    print(f"batch slider 1 -> {value}: plot {len(before)} -> {len(after)} base64 chars")
    assert int(value) > 1
    assert f"batch {value} x seq 512" in table_after, table_after
    assert after != before
    for tag, src in (("before", before), ("after", after)):
        path = screenshots / f"01_calculator_plot_{tag}.png"
        path.write_bytes(base64.b64decode(src.split(",", 1)[1]))
        print(f"plot image: {path}")
    shots.append(shot(calc, screenshots, "01_calculator_after.png"))
    assert problems(page) == []
