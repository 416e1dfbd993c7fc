"""The web chat page at `/` in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
selenium): typing a message streams the answer into the page, the answer equals `generate` on the same
conversation, the next turn carries the history, Reset clears it. A screenshot goes to the test artefacts
(``$LLM_TRAINER_TEST_ARTIFACTS``, else the test's temporary folder)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from llm_trainer.serve.loading import load_served_model
from serve_models import ServerProcess, make_llm_folder
from test_chat_cli import greedy_reply

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason="needs Debian's headless browser: apt-get install -y chromium chromium-driver")
N = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = make_llm_folder(tmp_path_factory.mktemp("browser") / "tiny-web")
    srv = ServerProcess(folder)
    yield load_served_model(folder), srv
    srv.stop()


@pytest.fixture
def browser(tmp_path):
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1000,760", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def _send(driver, text: str) -> str:
    """Type ``text``, press Enter, wait for the answer to finish; returns the answer shown."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".assistant"))
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    wait = WebDriverWait(driver, 120)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant")) > before)
    answer = driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1]
    wait.until(lambda d: answer.get_attribute("data-state") != "streaming")
    assert answer.get_attribute("data-state") == "done", answer.text
    return driver.execute_script("return arguments[0].lastChild.textContent", answer)


def test_web_chat_streams_keeps_history_and_resets(setup, browser, tmp_path):
    served, server = setup
    browser.get(server.url + "/")
    assert "tiny-web" in browser.find_element(By.ID, "model").text
    browser.find_element(By.CSS_SELECTOR, "details summary").click()
    for field, value in (("system", "Be brief."), ("temperature", "0"), ("max_tokens", str(N))):
        el = browser.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    system = {"role": "system", "content": "Be brief."}
    u1, u2 = {"role": "user", "content": "hello"}, {"role": "user", "content": "How are you?"}
    a1 = greedy_reply(served, [system, u1], n=N)
    a2 = greedy_reply(served, [system, u1, {"role": "assistant", "content": a1}, u2], n=N)

    assert _send(browser, "hello") == a1
    chunks = browser.execute_script("return window.llmChat.chunks")
    assert chunks > 1, "the answer must be rendered piece by piece as the server streams it"
    assert _send(browser, "How are you?") == a2
    shots = Path(os.environ.get("LLM_TRAINER_TEST_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shots / "web_chat.png"))
    print(f"screenshot: {shots / 'web_chat.png'}")
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".user")] == ["hello", "How are you?"]

    browser.find_element(By.ID, "reset").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    assert _send(browser, "hello") == a1  # no history after Reset
    assert server.health()["completed"] == 3
