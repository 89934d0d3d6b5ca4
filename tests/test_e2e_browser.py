"""End to end in a real headless browser: `launch.py` with the real default model and draft head,
driven by Playwright (Debian's /usr/bin/chromium).

Sends a message and watches the reply stream, checks the draft tree with its highlighted accepted path,
steps back one cycle, runs compare mode until both panes finish, moves the temperature and watches
the tree sliders switch to the sampling tree and back, and saves screenshots under
test-output/ (git-ignored). The server runs in its own process group and is always killed.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "test-output"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
START_TIMEOUT_S = 300
REPLY_TIMEOUT_MS = 180_000

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"launch.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    raise AssertionError(f"launch.py did not serve {url} within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(default_model_dir):
    from engine.models import default_head_path

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (the CI script installs it)")
    head = default_head_path()
    if not (head / "config.json").is_file():
        pytest.skip(f"no draft head at {head}: the e2e test needs the default head (see README: training)")
    OUT.mkdir(exist_ok=True)
    port = free_port()
    log = OUT / "e2e-server.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable, str(ROOT / "launch.py"), "--no-browser", "--port", str(port), "--max-new-tokens", "48",
                "--tree", "paper", "--sampling-tree", "4,2,4", "--method", "eagle2",
            ],
            cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_serving(proc, url, log)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1100})
            page.goto(server)
            page.wait_for_selector("#msg textarea", timeout=60_000)
            yield page
        finally:
            browser.close()


def caption_cycle(page) -> int:
    text = page.inner_text("#tree-panel .tree-caption")
    return int(re.match(r"Cycle (\d+)", text).group(1))


def test_chat_streams_and_draws_the_tree(page):
    page.fill("#msg textarea", "Write three short sentences about the sea.")
    page.click("#send")
    bot = page.locator("#chatbot .bot-row .message-content").last
    seen = []
    deadline = time.monotonic() + REPLY_TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        if bot.count():
            text = bot.inner_text().strip()
            if text and (not seen or seen[-1] != text):
                seen.append(text)
        if "—" in page.inner_text("#stats"):  # the stats line gets "— <why it ended>" when done
            break
        time.sleep(0.1)
    stats = page.inner_text("#stats")
    assert "—" in stats, f"reply did not finish: {stats!r}"
    final = bot.inner_text().strip()
    assert final, "no reply text"
    assert len(seen) >= 2, f"expected the reply to stream in several updates, saw {seen!r}"
    assert "tokens/s" in stats and "τ" in stats
    tau = float(re.search(r"τ ([0-9.]+)", stats).group(1))
    assert tau > 1.0, f"the draft head's guesses were never accepted (τ {tau})"

    page.wait_for_selector("#tree-panel svg.draft-tree", timeout=30_000)
    last = caption_cycle(page)
    assert last >= 2
    assert page.locator("#tree-panel svg g.node.root.accepted").count() == 1
    assert page.locator("#tree-panel svg g.node.rejected").count() >= 1
    page.locator("#tree-panel").screenshot(path=str(OUT / "tree.png"))

    page.click("#prev-cycle")
    page.wait_for_function(
        "n => /^Cycle (\\d+)/.exec(document.querySelector('#tree-panel .tree-caption').innerText)[1] == n",
        arg=str(last - 1), timeout=30_000,
    )
    # Stepping back shows an earlier tree; somewhere in the reply drafts were accepted beyond the root.
    accepted_beyond_root = 0
    for _ in range(last):
        accepted_beyond_root = max(
            accepted_beyond_root, page.locator("#tree-panel svg g.node.accepted:not(.root)").count()
        )
        if accepted_beyond_root or caption_cycle(page) <= 1:
            break
        before = caption_cycle(page)
        page.click("#prev-cycle")
        page.wait_for_function(
            "n => /^Cycle (\\d+)/.exec(document.querySelector('#tree-panel .tree-caption').innerText)[1] == n",
            arg=str(before - 1), timeout=30_000,
        )
    assert accepted_beyond_root >= 1
    assert page.locator("#tree-panel svg path.edge.accepted").count() >= 1

    page.click("#tint input")
    page.wait_for_selector("#chatbot .tinted .tok", timeout=30_000)
    page.screenshot(path=str(OUT / "chat.png"), full_page=True)


def test_compare_mode_runs_both_panes_to_the_end(page):
    page.get_by_role("tab", name="Compare").click()
    page.fill("#cmp-prompt textarea", "Name three colours of the rainbow.")
    page.click("#cmp-run")
    page.wait_for_selector("#pane-a .compare-pane", timeout=30_000)
    page.wait_for_selector("#cmp-summary :text('tokens/s for')", timeout=REPLY_TIMEOUT_MS)
    summary = page.inner_text("#cmp-summary")
    assert "What is measured" in summary and "ran alone" in summary
    assert "Texts identical" in summary
    for pane in ("#pane-a", "#pane-b"):
        assert page.locator(f"{pane} .compare-pane.done").count() == 1
        assert "tokens/s" in page.inner_text(f"{pane} .pane-stats")
        assert page.inner_text(f"{pane} .compare-pane").strip()
    page.screenshot(path=str(OUT / "compare.png"), full_page=True)


def slider_value(page, elem_id: str) -> str:
    return page.input_value(f"#{elem_id} input[type=number]")


def set_slider(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Enter")


def test_tree_sliders_switch_to_the_sampling_tree_and_back(page):
    page.get_by_role("tab", name="Chat").click()
    assert (slider_value(page, "tree-total"), slider_value(page, "tree-depth")) == ("60", "6")  # --tree paper
    set_slider(page, "temperature", "0.7")
    page.wait_for_function(
        "() => document.querySelector('#tree-total input[type=number]').value == '4'", timeout=30_000
    )
    assert slider_value(page, "tree-depth") == "2"  # --sampling-tree 4,2,4
    set_slider(page, "temperature", "0")
    page.wait_for_function(
        "() => document.querySelector('#tree-total input[type=number]').value == '60'", timeout=30_000
    )
    assert slider_value(page, "tree-depth") == "6"


def test_header_names_the_backend_and_its_promise(page):
    header = page.inner_text(".engine-line")
    assert re.search(r"· (int8|fp32|bf16|fp16) ·", header), header
    body = page.inner_text("body")
    assert "With temperature 0 the reply is" in body
    assert page.locator("#backend-note").count() == 1  # the measured choice, in the sidebar
