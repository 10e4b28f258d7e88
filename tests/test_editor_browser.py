"""The editor end to end in a real browser: Debian's chromium driven by selenium through Debian's chromedriver
(nothing downloads a browser), a Jupyter server on 127.0.0.1 with a token, ``notebooks/06_editor.ipynb`` opened in
JupyterLab and in Notebook 7 and run (Run > Run All Cells), two drags on the canvas, and checks that the displayed
image changed beyond the strokes and that the kernel painted exactly the pixels under the pointer (the status line
counts them). Skipped, with the reason, when chromium, chromedriver, selenium or JupyterLab is missing; ``.ci/run``
installs them. About 50 s on 2 cores.

The screenshot of the editor after the two strokes is written to the test's temporary folder, and (JupyterLab's)
also to ``$SOSVAE_EDITOR_SCREENSHOT`` when that is set. The model is a smoke-preset run trained here, or the run
directory ``$SOSVAE_EDITOR_RUN``. The README's picture (results/editor/editor_two_strokes.png) was made with

    python -m sosvae_lib.train --config cpu --dataset orl --head lowrank --rank 25 --image-size 64 \\
        --out runs/orl-lowrank-r25
    SOSVAE_EDITOR_RUN=runs/orl-lowrank-r25 SOSVAE_EDITOR_SCREENSHOT=results/editor/editor_two_strokes.png \\
        .venv/bin/python -m pytest -q tests/test_editor_browser.py
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sosvae_lib import editing as E
from sosvae_lib.reproduce import NOTEBOOKS_DIR

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FRONTENDS = {"lab": "lab/tree", "notebook": "notebooks"}  # JupyterLab 4 and Notebook 7: URL path of a notebook

_missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bool(_missing), reason=f"no {' and no '.join(_missing)}: install Debian's chromium "
                                                      f"and chromium-driver (.ci/run does) to run the browser test")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - 127.0.0.1 only
        return r.read()


@pytest.fixture(scope="module")
def run_dir(trained_smoke_run) -> Path:
    """$SOSVAE_EDITOR_RUN, else the session's smoke run (conftest; only read here)."""
    given = os.environ.get("SOSVAE_EDITOR_RUN")
    if given:
        return Path(given).resolve()
    return trained_smoke_run()


@pytest.fixture(scope="module")
def server(tmp_path_factory, run_dir):
    """A Jupyter server (JupyterLab and Notebook 7) on 127.0.0.1 (free port, random token) whose root holds
    06_editor-<frontend>.ipynb with its parameters set to ``run_dir`` and its figure written to
    figures-<frontend>/; yields (base url, token, root). Kernels and server are stopped afterwards."""
    pytest.importorskip("selenium")
    pytest.importorskip("anywidget")
    pytest.importorskip("jupyterlab")
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    root = tmp_path_factory.mktemp("jupyter")
    home = root / ".home"
    for frontend in FRONTENDS:
        nb = load_notebook_node(str(NOTEBOOKS_DIR / "06_editor.ipynb"))
        nb = parameterize_notebook(nb, dict(lowrank_run=str(run_dir), diagonal_run=None, train_missing=False,
                                            image_index=0, figures_dir=str(root / f"figures-{frontend}")))
        nbformat.write(nb, root / f"06_editor-{frontend}.ipynb")
    # an isolated Jupyter configuration: no news pop-up, nothing read from or written to the user's ~/.jupyter
    labconfig = home / "config" / "labconfig"
    labconfig.mkdir(parents=True)
    (labconfig / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    # start the notebook's own kernel without asking (JupyterLab otherwise may open a "Select Kernel" dialog)
    tracker = home / "settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"autoStartDefaultKernel": True}))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"), PYTHONUNBUFFERED="1")
    port, token = _free_port(), secrets.token_hex(16)
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                             f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
                             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
                             "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                             "--LabApp.extension_manager=readonly"] + (["--allow-root"] if os.geteuid() == 0 else []),
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _get(f"{base}/api/status?token={token}")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"jupyter lab did not start: {(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield base, token, root
    finally:
        try:  # shut the kernels down through the server, then the server itself
            for k in json.loads(_get(f"{base}/api/kernels?token={token}")):
                req = urllib.request.Request(f"{base}/api/kernels/{k['id']}?token={token}", method="DELETE")
                urllib.request.urlopen(req, timeout=10).close()  # noqa: S310
        except OSError:
            pass
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must never fetch a driver or a browser
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1500,1400", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _canvas_pixels(driver, canvas) -> list[int]:
    return driver.execute_script("const c = arguments[0];"
                                 "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);",
                                 canvas)


def _status(driver) -> str:
    return driver.execute_script(
        "const s = [...document.querySelectorAll('.widget-html-content small')].map(e => e.textContent)"
        ".filter(t => t.includes(' · R = ')); return s.length ? s[0] : '';")


def _session_kernel(base: str, token: str, name: str) -> tuple[str | None, str | None]:
    """(kernel id, execution state) of the server's session of notebook ``name`` ((None, None) if none)."""
    for session in json.loads(_get(f"{base}/api/sessions?token={token}")):
        if session.get("path", "").endswith(name) and session.get("kernel"):
            return session["kernel"]["id"], session["kernel"].get("execution_state")
    return None, None


def _stable_kernel(base: str, token: str, name: str, quiet: float = 3.0, timeout: float = 90.0) -> str:
    """The id of the kernel of notebook ``name`` once it has been the same and idle for ``quiet`` seconds (a
    frontend that is still settling may replace the kernel it started first)."""
    deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        kid, state = _session_kernel(base, token, name)
        if kid is None or state != "idle" or kid != last:
            last, since = kid, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return kid
        time.sleep(0.25)
    raise TimeoutError(f"the kernel of {name} did not settle within {timeout:.0f} s (last: {last})")


def _fail(driver, root: Path, tmp_path: Path, what: str) -> None:
    """Fail with what the page and the server show (screenshot and server log kept in tmp_path)."""
    driver.save_screenshot(str(tmp_path / "failure.png"))
    shutil.copyfile(root / "server.log", tmp_path / "server.log")
    prompts = [e.text for e in driver.find_elements("css selector", ".jp-InputPrompt")]
    errors = [e.text[:500] for e in driver.find_elements("css selector", ".jp-RenderedText[data-mime-type*=error]")]
    log = (root / "server.log").read_text()[-1500:]
    pytest.fail(f"{what}; prompts {prompts}; errors {errors}; screenshot and server log in {tmp_path}; "
                f"server log: {log}")


def _drag(driver, canvas, rect, points) -> None:
    """Press at points[0], move through the others, release; points in CSS pixels from the canvas' corner."""
    from selenium.webdriver.common.action_chains import ActionChains

    cx, cy = rect["width"] / 2, rect["height"] / 2
    chain = ActionChains(driver, duration=50)
    chain.move_to_element_with_offset(canvas, round(points[0][0] - cx), round(points[0][1] - cy)).click_and_hold()
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        chain.move_by_offset(round(x1) - round(x0), round(y1) - round(y0))
    chain.release().perform()


@pytest.mark.parametrize("frontend", list(FRONTENDS))
def test_the_editor_paints_in_the_browser(frontend, server, browser, run_dir, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    base, token, root = server
    t0 = time.perf_counter()
    browser.get(f"{base}/{FRONTENDS[frontend]}/06_editor-{frontend}.ipynb?token={token}")
    wait = WebDriverWait(browser, 90, poll_frequency=0.25)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator[data-status='idle']"))

    def started(d) -> bool:  # some cell's prompt shows [*] or an execution count
        return any(re.search(r"\[(\*|\d+)\]", e.text) for e in d.find_elements(By.CSS_SELECTOR, ".jp-InputPrompt"))

    done = root / f"figures-{frontend}" / "orl_editor.json"  # the notebook's last cell writes it
    for attempt in range(3):  # Run > Run All Cells; retried when the frontend swapped kernels under it
        kernel = _stable_kernel(base, token, f"06_editor-{frontend}.ipynb")
        for dialog in browser.find_elements(By.CSS_SELECTOR, "dialog.jp-Dialog"):
            # JupyterLab sometimes asks for the kernel although the notebook names one: accept its proposal
            if "Select Kernel" not in dialog.text:
                _fail(browser, root, tmp_path, f"a dialog is open: {dialog.text!r}")
            dialog.find_element(By.CSS_SELECTOR, ".jp-Dialog-button.jp-mod-accept").click()
            WebDriverWait(browser, 10).until(lambda d: not d.find_elements(By.CSS_SELECTOR, "dialog.jp-Dialog"))
            kernel = _stable_kernel(base, token, f"06_editor-{frontend}.ipynb")
        wait.until(lambda d: d.find_element(By.XPATH, "//li[contains(@class, 'lm-MenuBar-item')]"
                                                      "[.//div[normalize-space(text())='Run']]")).click()
        wait.until(lambda d: d.find_element(By.XPATH, "//li[contains(@class, 'lm-Menu-item')]"
                                                      "[.//div[normalize-space(text())='Run All Cells']]")).click()
        try:
            WebDriverWait(browser, 15, poll_frequency=0.25).until(started)
            WebDriverWait(browser, 120, poll_frequency=0.5).until(
                lambda d: done.is_file() or _session_kernel(base, token, f"06_editor-{frontend}.ipynb")[0] != kernel)
        except TimeoutException:
            browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        if done.is_file():
            break
    else:
        _fail(browser, root, tmp_path, "the notebook did not run to its end (3 tries of Run All Cells)")
    canvas = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'canvas.sosvae-canvas[data-editable="true"]'))
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", canvas)
    wait.until(lambda d: int(canvas.get_attribute("data-version") or 0) >= 1 and "0 strokes" in _status(d))
    rect = browser.execute_script("return arguments[0].getBoundingClientRect().toJSON();", canvas)
    from sosvae_lib.runs import Run
    shape = Run(run_dir).load_model().image_shape
    c, h, w = shape
    cell_w, cell_h = rect["width"] / w, rect["height"] / h
    assert abs(rect["width"] - w * (512 // max(h, w))) < 1  # drawn enlarged, an integer number of px per pixel
    width = E.default_width((h, w))

    def at(r: float, col: float) -> tuple[float, float]:  # the centre of pixel (⌊r⌋, ⌊col⌋) on screen
        return ((int(col) + 0.5) * cell_w, (int(r) + 0.5) * cell_h)

    before = _canvas_pixels(browser, canvas)
    painted = set()
    # stroke 1: across the top of the head (the hair), left to right along one row
    r1, c0, c1 = int(0.14 * h), int(0.36 * w), int(0.64 * w)
    v = int(canvas.get_attribute("data-version"))
    _drag(browser, canvas, rect, [at(r1, c0), at(r1, (c0 + c1) / 2), at(r1, c1)])
    wait.until(lambda d: int(canvas.get_attribute("data-version")) > v and "1 stroke " in _status(d))
    painted |= set(map(tuple, E.stroke_pixels([(r1, c0), (r1, c1)], (h, w), width).nonzero().tolist()))
    assert f"· {len(painted)} pixels painted" in _status(browser), _status(browser)
    after_one = _canvas_pixels(browser, canvas)
    assert after_one != before
    # stroke 2: down the forehead, top to bottom along one column
    col2, r2a, r2b = int(0.5 * w), int(0.26 * h), int(0.40 * h)
    v = int(canvas.get_attribute("data-version"))
    _drag(browser, canvas, rect, [at(r2a, col2), at(r2b, col2)])
    wait.until(lambda d: int(canvas.get_attribute("data-version")) > v and "2 strokes" in _status(d))
    painted |= set(map(tuple, E.stroke_pixels([(r2a, col2), (r2b, col2)], (h, w), width).nonzero().tolist()))
    assert f"· {len(painted)} pixels painted" in _status(browser), _status(browser)
    after = _canvas_pixels(browser, canvas)
    # the displayed image changed, and not only under the strokes: the edit propagated
    scale = round(cell_w)
    changed_outside = 0
    for i in range(h):
        for j in range(w):
            k = 4 * ((i * scale + scale // 2) * int(rect["width"]) + j * scale + scale // 2)
            if (i, j) not in painted and before[k:k + 3] != after[k:k + 3]:
                changed_outside += 1
    assert changed_outside > 0
    ms = float(re.search(r"update ([0-9.]+) ms", _status(browser)).group(1))
    assert ms < 10_000
    # the screenshot of the whole editor (both tabs' header, the image, samples, controls)
    box = canvas.find_element(By.XPATH, "ancestor::div[contains(concat(' ', normalize-space(@class), ' '), "
                                        "' widget-tab ')][1]")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    shot = tmp_path / "editor_two_strokes.png"
    assert box.screenshot(str(shot)) and shot.stat().st_size > 5000
    target = os.environ.get("SOSVAE_EDITOR_SCREENSHOT")
    if target and frontend == "lab":
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
    # the "erase and fill" brush: a drag along the chin erases those pixels and fills them by real inpainting
    browser.find_element(By.XPATH, "//button[normalize-space(.)='erase and fill']").click()
    r3, c3a, c3b = int(0.85 * h), int(0.3 * w), int(0.7 * w)
    v = int(canvas.get_attribute("data-version"))
    _drag(browser, canvas, rect, [at(r3, c3a), at(r3, c3b)])
    try:
        wait.until(lambda d: int(canvas.get_attribute("data-version")) > v and "erased and filled" in _status(d))
    except TimeoutException:
        _fail(browser, root, tmp_path, f"no erase after the drag; status {_status(browser)!r}, version "
                                       f"{canvas.get_attribute('data-version')} (was {v})")
    erased = E.stroke_pixels([(r3, c3a), (r3, c3b)], (h, w), width)
    assert f"· {int(erased.sum())} pixels erased and filled" in _status(browser), _status(browser)
    assert _canvas_pixels(browser, canvas) != after
    assert time.perf_counter() - t0 < 150
