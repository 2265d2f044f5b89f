"""The chat page and the dashboard, driven in headless Chromium (Debian's chromium + chromium-driver
through selenium) against a real server tree. Screenshots of both pages go to bench/results/.

No browser means a failure, not a skip: `.ci/run` installs chromium and chromium-driver when missing.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import start_server, wait_for

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1360,900"]

pytestmark = pytest.mark.slow


def _find(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"none of {names} is installed: apt-get install chromium chromium-driver "
                "(.ci/run does this); the browser tests never skip themselves", pytrace=False)


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):  # noqa: ANN001, ANN201
    handle = start_server(["--narrate"], tmp_path_factory, "browser-server")
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed (it is in the dev extra: pip install -e '.[dev]')", pytrace=False)
    opts = Options()
    opts.binary_location = _find("chromium", "chromium-browser", "google-chrome")
    profile = tempfile.mkdtemp(prefix="minisgl-chromium-")
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(_find("chromedriver")), options=opts)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def gateway_inflight(url: str) -> tuple[int, int]:
    m = httpx.get(url + "/metrics", headers={"Accept": "application/json"}, timeout=10).json()
    return m["scheduler"]["inflight"], m["inflight_streams"]


def last_reply(driver) -> str:  # noqa: ANN001
    return driver.execute_script(
        "const m = document.querySelectorAll('.msg.assistant .body'); return m.length ? m[m.length - 1].textContent : '';")


def last_stats(driver) -> dict | None:  # noqa: ANN001
    return driver.execute_script(
        "const s = document.querySelectorAll('.msg.assistant .stats');"
        "if (!s.length) return null; const e = s[s.length - 1];"
        "return {cached: e.dataset.cached, finish: e.dataset.finish, text: e.textContent};")


def set_field(driver, field_id: str, value: str) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, field_id)
    box.clear()
    box.send_keys(value)


def send(driver, text: str) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "input").send_keys(text)
    driver.find_element(By.ID, "send").click()


def screenshot(driver, name: str) -> None:  # noqa: ANN001
    RESULTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(RESULTS / name))


def test_chat_streams_stops_and_reuses_the_first_turn(server, browser) -> None:
    from selenium.webdriver.common.by import By

    d = browser
    d.get(server.url + "/")
    assert wait_for(lambda: "SmolLM2" in d.find_element(By.ID, "model").text, 20), "the page names the model"

    # 1. a long reply streams in token by token
    set_field(d, "max-tokens", "1024")
    send(d, "Write a very long story about a dragon who learns to cook, with many chapters.")
    lengths: list[int] = []
    deadline = time.monotonic() + 90
    # watch ~100 tokens arrive (a few hundred ms at this CPU's 200+ tok/s: enough polls to see it grow;
    # the reply runs to 1024 tokens, so it is still streaming when Stop is pressed below)
    while time.monotonic() < deadline and (not lengths or lengths[-1] < 400):
        n = len(last_reply(d))
        if n and (not lengths or n != lengths[-1]):
            lengths.append(n)
        time.sleep(0.02)
    assert len(lengths) >= 5 and lengths == sorted(lengths), f"text should grow chunk by chunk, saw {lengths}"
    assert gateway_inflight(server.url)[1] == 1, "the reply is still streaming when Stop is pressed"

    # 2. Stop is a real disconnect: the server aborts the request and frees it
    d.find_element(By.ID, "stop").click()
    assert wait_for(lambda: gateway_inflight(server.url) == (0, 0), 5, 0.1), \
        f"in-flight should drop to 0 after Stop, got {gateway_inflight(server.url)}"
    stats = wait_for(lambda: last_stats(d), 5)
    assert stats and stats["finish"] == "stopped", stats
    stopped_at = len(last_reply(d))
    time.sleep(0.5)
    assert len(last_reply(d)) == stopped_at, "nothing arrives after Stop"

    # 3. a second turn resends the first: its prompt comes from the prefix cache
    set_field(d, "max-tokens", "24")
    send(d, "Give the story a short title.")
    assert wait_for(lambda: (last_stats(d) or {}).get("finish") in ("stop", "length") and
                    d.find_element(By.ID, "send").is_enabled(), 120, 0.2), last_stats(d)
    stats = last_stats(d)
    assert int(stats["cached"]) > 0 and "cached" in stats["text"], stats
    for label in ("TTFT", "tok/s", "prompt", "completion", "finish", "worker"):
        assert label in stats["text"], (label, stats["text"])
    screenshot(d, "chat.png")


def test_chat_renders_text_never_html(server, browser) -> None:
    from selenium.webdriver.common.by import By

    d = browser
    d.get(server.url + "/")
    set_field(d, "max-tokens", "4")
    send(d, "<img src=x onerror=\"document.title='pwned'\"><b>bold</b> `code`")
    assert wait_for(lambda: d.find_element(By.ID, "send").is_enabled() and last_stats(d), 60, 0.2)
    user = d.find_elements(By.CSS_SELECTOR, ".msg.user .body")[-1]
    assert "<img src=x" in user.text and "<b>bold</b>" in user.text
    assert not user.find_elements(By.CSS_SELECTOR, "img, b"), "user text is never parsed as HTML"
    assert d.title != "pwned"
    # the renderer the replies go through: markup in model output stays text, fences become <pre>
    made = d.execute_script(
        "const b = document.createElement('div');"
        "render(b, 'a <script>x</script> <img src=y onerror=alert(1)> ```py\\nprint(1)\\n``` end');"
        "return {imgs: b.querySelectorAll('img, script').length, pre: b.querySelector('pre').textContent, text: b.textContent};")
    assert made["imgs"] == 0 and made["pre"] == "print(1)\n" and "<script>x</script>" in made["text"]


def test_dashboard_shows_the_server_live(server, browser) -> None:
    from selenium.webdriver.common.by import By

    d = browser
    messages = [{"role": "user", "content": "Name three colours."}]
    for _ in range(2):  # the second reuses the first's prompt from the prefix cache
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200
    d.get(server.url + "/dashboard")
    assert wait_for(lambda: d.find_element(By.ID, "total-requests").text not in ("", "–") and
                    int(float(d.find_element(By.ID, "total-requests").text)) >= 2, 20), "requests counted"
    rows = d.find_elements(By.CSS_SELECTOR, "#recent tr")
    assert rows and any(int(r.find_elements(By.TAG_NAME, "td")[4].text or 0) > 0 for r in rows), \
        "a recent request shows its cached prefix"
    workers = d.find_elements(By.CSS_SELECTOR, "#workers tr")
    assert len(workers) == 1 and "up" in workers[0].text
    assert wait_for(lambda: "decode step" in d.find_element(By.ID, "feed").text, 20), "the narration feed is live"
    assert d.find_elements(By.CSS_SELECTOR, "#c-tps path.line"), "the throughput chart is drawn"
    d.set_window_size(1360, 1300)  # the whole page, narration feed included
    time.sleep(1.5)  # one more poll, so the charts include the last second
    screenshot(d, "dashboard.png")
