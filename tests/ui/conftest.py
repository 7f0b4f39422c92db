"""The dashboard's fixtures: a real browser (Debian's chromium through chromium-driver, driven by Selenium) and
the dashboard served in a thread over a folder of runs that holds a copy of the finished tiny run."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER = "/usr/bin/chromedriver"
INSTALL = "apt-get install -y chromium chromium-driver && pip install \".[dev]\""


def _missing_browser() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return f"selenium is not installed ({INSTALL})"
    if not any(Path(p).is_file() for p in CHROMIUM) or not Path(DRIVER).is_file():
        return f"no chromium and chromium-driver in /usr/bin ({INSTALL})"
    return None


@pytest.fixture(scope="session")
def browser():
    """Headless chromium. Without one the test skips, with the reason; under CI=true it fails instead."""
    missing = _missing_browser()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs a browser for the dashboard's tests: {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = next(p for p in CHROMIUM if Path(p).is_file())
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    """The dashboard's app served by uvicorn in a thread of the test process."""

    def __init__(self, runs_dir: Path, host: str = "127.0.0.1", token: str | None = None) -> None:
        import uvicorn

        from sapo_lite.ui.server import Settings, build_app

        self.settings = Settings(runs_dir, poll_ms=500)
        self.host, self.port, self.token = host, free_port(), token
        config = uvicorn.Config(build_app(self.settings, host, token), host=host, port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.started, "the dashboard did not start"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self.settings.jobs.stop_all()
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def runs_dir(finished_tiny_run, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dashboard") / "runs"
    folder.mkdir()
    shutil.copytree(finished_tiny_run, folder / "done")
    return folder


@pytest.fixture(scope="module")
def dashboard(runs_dir):
    served = Served(runs_dir)
    yield served
    served.close()


@pytest.fixture
def shots(tmp_path, request):
    """save(name): a screenshot of the page into the test's folder; with SAPO_UI_SCREENSHOTS=DIR, also DIR/NAME."""
    def save(driver, name: str) -> Path:
        path = tmp_path / f"{name}.png"
        driver.save_screenshot(str(path))
        docs = os.environ.get("SAPO_UI_SCREENSHOTS")
        if docs:
            shutil.copy(path, Path(docs) / f"{name}.png")
        return path

    return save
