"""The way users meet the study: JupyterLab (``make lab``'s command) on localhost, driven in
headless Chromium. Notebook 01 is opened, every cell run at quick scale, and the page must
show no error output and its figures as rendered images.

    python -m pytest -m browser          # this test alone (needs chromium + chromedriver)
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quick_copy(dest: Path) -> Path:
    """Notebook 01 with its parameters cell set to the quick scale."""
    nb = nbformat.read(ROOT / "notebooks" / "01_sequential_baseline.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = 'scale = "quick"\nmeasure = True'
    # the committed copy carries papermill's injected cell (measure = False) after it
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    path = dest / "01_sequential_baseline.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.fixture
def lab(tmp_path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("the browser test needs Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver)")
    work = tmp_path / "lab"
    work.mkdir()
    quick_copy(work)
    port = free_port()
    # as `make lab` runs it: without the Makefile's MPLBACKEND=agg, so figures are images
    env = {**{k: v for k, v in os.environ.items() if k != "MPLBACKEND"},
           "CNN_RESULTS_DIR": str(tmp_path / "results"),
           "CNN_IMAGES_DIR": str(tmp_path / "images"), "PYTHONPATH": str(ROOT),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "jcfg"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jrun")}
    # make lab's command, on a free port, with no token (localhost only) and no browser
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
           "--ip=127.0.0.1", "--ServerApp.token=", "--ServerApp.password=",
           "--ServerApp.disable_check_xsrf=True", f"--ServerApp.root_dir={work}",
           "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=",
           "--LabApp.check_for_updates_class="
           "jupyterlab.NeverCheckForUpdate", "--allow-root"]
    with open(tmp_path / "lab.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/lab/tree/01_sequential_baseline.ipynb"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.5)
        else:
            proc.kill()
            pytest.fail("JupyterLab did not listen within 90 s:\n" +
                        (tmp_path / "lab.log").read_text()[-3000:])
        try:
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_notebook_01_runs_in_jupyterlab_in_a_real_browser(lab):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(lab)
        wait = WebDriverWait(driver, 180)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")))
        # wait for the kernel, then Run > Run All Cells through JupyterLab's command registry
        wait.until(lambda d: d.execute_script(
            "const a = window.jupyterapp; if (!a) return false;"
            "const w = a.shell.currentWidget;"
            "return !!(w && w.sessionContext && w.sessionContext.session &&"
            " w.sessionContext.session.kernel &&"
            " w.sessionContext.session.kernel.status === 'idle');"))
        driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        code_cells = len(driver.find_elements(By.CSS_SELECTOR, ".jp-CodeCell"))

        def all_ran(d):
            prompts = d.find_elements(By.CSS_SELECTOR, ".jp-CodeCell .jp-InputPrompt")
            done = [p for p in prompts if re.fullmatch(r"\[\d+\]:?", p.text.strip())]
            return len(done) == code_cells

        WebDriverWait(driver, 600, poll_frequency=2).until(all_ran)
        # what every cell produced, from the notebook model (the DOM holds only the cells
        # in view), then that figures really render as images in the page
        produced = driver.execute_script("""
            const nb = window.jupyterapp.shell.currentWidget.content.model;
            const out = {errors: [], images: 0};
            for (let c = 0; c < nb.cells.length; c++) {
              const cell = nb.cells.get(c);
              if (cell.type !== 'code') continue;
              for (let i = 0; i < cell.outputs.length; i++) {
                const o = cell.outputs.get(i).toJSON();
                if (o.output_type === 'error') out.errors.push(o.ename + ': ' + o.evalue);
                if (o.data && o.data['image/png']) out.images += 1;
              }
            }
            return out;""")
        assert not produced["errors"], produced["errors"]
        assert produced["images"] >= 4, produced
        images = driver.find_elements(By.CSS_SELECTOR, ".jp-RenderedImage img")
        rendered = [i for i in images if driver.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 100", i)]
        assert rendered, f"no figure rendered as an image in the page ({len(images)} img)"
        dom_errors = driver.find_elements(
            By.CSS_SELECTOR, '[data-mime-type="application/vnd.jupyter.error"]')
        assert not dom_errors, [e.text[:300] for e in dom_errors]
    finally:
        driver.quit()
