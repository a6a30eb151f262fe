"""A real headless Chromium for the tests, and what a person reads on the pages of the
Prefect UI and of Girder's web client.

The browser is Debian's ``chromium`` and its ``chromium-driver`` (``make browser``
installs them when missing; ``make test`` and ``make integration`` run it), driven by
Selenium through ``/usr/bin/chromedriver``: no browser is downloaded. Each reader waits
for the page to be rendered, then returns what is shown (names, states, metadata), so
that a test asserts on the page and not on the REST API behind it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CHROMIUM", "CHROMEDRIVER", "start_chromium", "Pages"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: Headless, and nothing that reaches outside the machine (the network is closed: without
#: the background-networking flags Chromium keeps trying Google's hosts).
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--window-size=1400,1000")
PAGE_TIMEOUT = 60.0


def start_chromium(profile_dir: Path):
    """A Selenium driver of Debian's Chromium, with a fresh profile in ``profile_dir``."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    assert not missing, (f"{', '.join(missing)} missing: run `make browser` (Debian's "
                         "chromium and chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@dataclass
class Pages:
    """Opens pages in ``driver``, reads them, and keeps screenshots in ``shots``."""

    driver: object
    shots: Path

    def _open(self, url: str, ready_css: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as EC
        from selenium.webdriver.support.ui import WebDriverWait
        self.driver.get(url)
        WebDriverWait(self.driver, PAGE_TIMEOUT).until(
            EC.presence_of_element_located((By.CSS_SELECTOR, ready_css)),
            f"{url}: nothing matching {ready_css!r} within {PAGE_TIMEOUT:.0f}s")

    def _texts(self, css: str) -> list[str]:
        return self.driver.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0]))"
            ".map(e => e.innerText.trim())", css)

    def _settled(self, css: str, seconds: float = 1.0) -> list[str]:
        """The texts of ``css`` once two reads ``seconds`` apart agree (lists render in
        steps), at most ``PAGE_TIMEOUT``."""
        deadline = time.monotonic() + PAGE_TIMEOUT
        before = self._texts(css)
        while time.monotonic() < deadline:
            time.sleep(seconds)
            now = self._texts(css)
            if now == before:
                return now
            before = now
        return before

    def shot(self, name: str) -> Path:
        """Save a screenshot ``name`` (.png) of what the browser shows; print its path."""
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        print(f"[browser] screenshot {path}", flush=True)
        return path

    # -- Prefect UI ----------------------------------------------------------------
    def deployments(self, ui: str) -> list[str]:
        """The names in the Deployments page's list."""
        css = "a[href*='/deployments/deployment/']"
        self._open(f"{ui}/deployments", css)
        return self._settled(css)

    def flow_run(self, url: str) -> tuple[str, str]:
        """(state shown in the run's header, its deployment) on a flow run's page."""
        self._open(url, ".state-badge")
        state = self._settled(".state-badge")[0]
        deployment = self.driver.execute_script(
            "const a = document.querySelector(\"a[href*='/deployments/deployment/']\");"
            "return a ? a.innerText.trim() : ''")
        return state, deployment

    def run_artifacts(self) -> list[str]:
        """The keys listed in the Artifacts tab of the flow run page open now."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as EC
        from selenium.webdriver.support.ui import WebDriverWait
        WebDriverWait(self.driver, PAGE_TIMEOUT).until(
            EC.element_to_be_clickable((By.CSS_SELECTOR, "li.p-tab#artifacts"))).click()
        WebDriverWait(self.driver, PAGE_TIMEOUT).until(
            lambda d: "gus-" in d.find_element(By.CSS_SELECTOR, "#artifacts-content").text)
        text = self._settled("#artifacts-content")[0]
        self.driver.execute_script(  # for the screenshot: the tab's content, not the graph
            "document.querySelector('.p-tabs, #artifacts-content').scrollIntoView()")
        return [line.strip() for line in text.splitlines() if line.strip().startswith("gus-")]

    # -- Girder's web client ----------------------------------------------------------
    def girder_folder(self, url: str) -> tuple[list[str], list[str]]:
        """(sub-folder names, item names) a visitor sees in a folder."""
        self._open(url, ".g-item-list, .g-folder-list")
        return (self._settled(".g-folder-list-link"), self._settled(".g-item-list-link"))

    def girder_item(self, url: str) -> tuple[str, dict[str, object]]:
        """(the item's name, its metadata as shown: key -> value, JSON values parsed)."""
        self._open(url, ".g-item-name")
        self._settled(".g-item-metadata")
        name = self._texts(".g-item-name")[0]
        keys = self._texts(".g-widget-metadata-row .g-widget-metadata-key")
        values = self._texts(".g-widget-metadata-row .g-widget-metadata-value")
        return name, {key: _parsed(value) for key, value in zip(keys, values)}


def _parsed(text: str) -> object:
    """A metadata value as Girder's page shows it: objects as JSON, strings as such."""
    try:
        return json.loads(text)
    except ValueError:
        return text
