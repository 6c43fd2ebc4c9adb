"""Fixtures for the browser test (``make e2e``): a JupyterLab server started as ``make lab`` starts it, and
Debian's Chromium driven by Playwright.

The server: ``.venv/bin/jupyter lab`` on a copy of notebooks/ (the browser runs cells and JupyterLab saves, so the
committed notebooks are never written), headless, a random token, a free port on 127.0.0.1 only, Jupyter's config,
data, runtime and settings folders in a temporary folder, so the only kernel it finds is the project's .venv one
(``python3``, installed there with ``--sys-prefix`` by the Makefile). Teardown shuts the kernels and the server down
(REST first, then SIGTERM, then SIGKILL, each bounded) and closes the browser.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv"
SCREENSHOTS = Path(os.environ.get("E2E_SCREENSHOTS", Path(__file__).resolve().parent / "screenshots"))

if not os.environ.get("LORABOOK_E2E"):
    # `pytest tests` (make test, CI's time budget) leaves the browser test out; `make e2e` sets LORABOOK_E2E=1.
    collect_ignore_glob = ["test_*.py"]


@dataclass
class Lab:
    url: str  # http://127.0.0.1:PORT
    token: str
    root: Path  # the folder JupyterLab serves (a copy of notebooks/)
    log: Path  # the server's stdout + stderr

    def api(self, method: str, path: str, timeout: float = 15.0):
        """One call to the server's REST API; the decoded JSON body (None when empty)."""
        req = urllib.request.Request(self.url + path, method=method,
                                     headers={"Authorization": f"token {self.token}"},
                                     data=b"" if method in ("POST", "PATCH") else None)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not path:
        pytest.fail("Debian's chromium is missing: `make e2e` installs it (apt-get install -y chromium)")
    return path


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


@pytest.fixture(scope="session")
def lab(tmp_path_factory) -> Lab:
    jupyter = VENV / "bin" / "jupyter"
    assert jupyter.exists(), f"{jupyter} is missing: run `make e2e` (it sets up .venv first)"
    base = tmp_path_factory.mktemp("lab")
    root = base / "notebooks"
    shutil.copytree(REPO / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    env = dict(os.environ)
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "workspaces")):
        env[var] = str(base / sub)
    env.pop("JUPYTER_PATH", None)
    # No network here: never ask for or fetch Jupyter's news feed (its toast would also cover the notebook).
    news = base / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))

    port, token = free_port(), secrets.token_hex(24)
    cmd = [str(jupyter), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: the test reads the notebook model too
           *(["--allow-root"] if os.geteuid() == 0 else []), str(root)]
    log = base / "jupyter.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = Lab(url=f"http://127.0.0.1:{port}", token=token, root=root, log=log)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                server.api("GET", "/api/status", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not answer within 180 s:\n{server.log_tail()}")
                time.sleep(0.5)
        specs = server.api("GET", "/api/kernelspecs")
        argv0 = Path(specs["kernelspecs"][specs["default"]]["spec"]["argv"][0])
        assert specs["default"] == "python3", specs["default"]
        assert argv0.parent == VENV / "bin", f"the python3 kernel runs {argv0}, not the project's .venv"
        print(f"\njupyter lab on {server.url} (pid {proc.pid}), serving a copy of notebooks/ in {root}; "
              f"kernel python3 -> {argv0}")
        yield server
    finally:
        stop_server(server, proc)


def stop_server(server: Lab, proc: subprocess.Popen) -> None:
    """Kernels first (REST), then the server: its own shutdown call, SIGTERM, SIGKILL, each bounded in time."""
    if proc.poll() is None:
        try:
            for kernel in server.api("GET", "/api/kernels", timeout=5):
                server.api("DELETE", f"/api/kernels/{kernel['id']}", timeout=30)
            server.api("POST", "/api/shutdown", timeout=10)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
    for sig, wait in ((None, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        if sig is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)  # the group this fixture started (the server and its kernels)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # Debian's Chromium, never a Playwright browser download. Playwright adds --no-sandbox (needed as root).
        chromium = pw.chromium.launch(executable_path=chromium_path(), headless=True, timeout=120_000,
                                      args=["--disable-dev-shm-usage", "--disable-gpu", "--no-first-run"])
        try:
            print(f"\nchromium {chromium.version} from {chromium_path()}")
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, lab):
    """A fresh browser context for each test; its notebook's kernel is shut down after it."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.set_default_timeout(60_000)
    tab = context.new_page()
    try:
        yield tab
    finally:
        context.close()
        try:
            for session in lab.api("GET", "/api/sessions", timeout=10):
                lab.api("DELETE", f"/api/sessions/{session['id']}", timeout=30)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
