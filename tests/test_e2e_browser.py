"""End to end in a real headless browser: `launch.py` with the real default model and draft head,
driven by Playwright (Debian's /usr/bin/chromium); and the same page served in-process on the tiny random
model (tests/tiny.py, letters and spaces only), for the layout at four window sizes, the input checks and
the Stop / Clear / queue sequences, with the engine slowed so that a reply streams for a few seconds.

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
from contextlib import contextmanager
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
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (the CI script installs it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str, width: int = 1600, height: int = 1100):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(url)
    page.wait_for_selector("#msg textarea", timeout=60_000)
    return page


@contextmanager
def opened(browser, url: str, width: int = 1600, height: int = 1100):
    """`open_page`, closed when the block ends, whatever happens in it."""
    page = open_page(browser, url, width, height)
    try:
        yield page
    finally:
        page.close()


@pytest.fixture(scope="module")
def page(server, browser):
    with opened(browser, server) as page:
        yield page


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


def test_chat_tree_and_stats_fit_a_1280x800_window(server, browser):
    """The README's screenshot: one reply at 1280x800, with the chat, the tree and the stats in view."""
    with opened(browser, server, 1280, 800) as page:
        send(page, "Write three short sentences about the sea.")
        wait_done(page, REPLY_TIMEOUT_MS)
        page.wait_for_selector("#tree-panel svg.draft-tree", timeout=30_000)
        assert_in_view(page, 1280, 800, "#chatbot", "#tree-panel", "#stats", ".tree-legend", "#how-to-read")
        page.screenshot(path=str(OUT / "chat-1280x800.png"))  # docs/screenshots/chat.png is a copy


# ---- the same page on the tiny model, served in-process ----------------------------------------------

SLOW_S = 0.25  # seconds the tiny engine sleeps per cycle, so a reply streams for a few seconds


@pytest.fixture(scope="module")
def tiny():
    """(url, messages the model was given, one list per reply) for the page on the tiny model."""
    from app.settings import AppOptions
    from app.ui import CSS_PATH, build_ui, load_examples
    from engine.config import TreeConfig
    from tests.test_gradio_client import free_port as port
    from tests.tiny import tiny_engine

    engine = tiny_engine(vocab_size=31)  # letters and spaces: no Markdown in the replies
    given, generate, chat_ids = [], engine.generate, engine.chat_ids

    def slow_generate(*args, **kwargs):
        for event in generate(*args, **kwargs):
            if event["type"] == "cycle":
                time.sleep(SLOW_S)
            yield event

    def spy_chat_ids(messages, *args, **kwargs):
        given.append([dict(m) for m in messages])
        return chat_ids(messages, *args, **kwargs)

    engine.generate, engine.chat_ids = slow_generate, spy_chat_ids
    options = AppOptions(
        poll_s=0.05, examples=load_examples(), max_new_tokens=40, tree=TreeConfig(12, 4, 4), tree_note="a test tree",
        sampling_tree=TreeConfig(5, 2, 3), sampling_tree_note="a sampling tree",
    )
    demo = build_ui(engine, options)
    demo.launch(server_port=port(), prevent_thread_lock=True, quiet=True, css_paths=[CSS_PATH])
    try:
        yield demo.local_url, given
    finally:
        demo.close()


def assert_in_view(page, width: int, height: int, *selectors: str) -> None:
    for selector in selectors:
        box = page.locator(selector).first.bounding_box()
        assert box is not None, f"{selector} is not shown"
        inside = box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= width + 1
        assert inside and box["y"] + box["height"] <= height + 1, f"{selector} at {box} is outside {width}x{height}"


def box(page, selector: str) -> dict:
    return page.locator(selector).first.bounding_box()


def assert_placeholder_fits(page, selector: str) -> None:
    """The placeholder's rendered width (canvas measureText in the box's own font) fits inside the box."""
    fits = page.evaluate(
        """sel => { const el = document.querySelector(sel); const cs = getComputedStyle(el);
        const ctx = document.createElement('canvas').getContext('2d'); ctx.font = cs.font;
        const room = el.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
        return [ctx.measureText(el.placeholder).width, room]; }""",
        selector,
    )
    assert fits[0] <= fits[1], f"{selector} placeholder needs {fits[0]:.0f} px, has {fits[1]:.0f}"


CLIPPED = "sel => { const e = document.querySelector(sel); return e.scrollWidth > e.clientWidth }"


def wait_done(page, timeout_ms: int = 60_000) -> str:
    page.wait_for_function("() => document.querySelector('#stats').innerText.includes('—')", timeout=timeout_ms)
    return page.inner_text("#stats")


def wait_reply(page, replies: int) -> str:
    """Wait until the chat shows `replies` replies and the last has finished."""
    page.wait_for_function(
        "n => document.querySelectorAll('#chatbot .bot-row').length == n "
        "&& document.querySelector('#stats').innerText.includes('—')",
        arg=replies, timeout=60_000,
    )
    return page.inner_text("#stats")


def send(page, text: str) -> None:
    page.fill("#msg textarea", text)
    page.click("#send")


def screen_history(page) -> list[tuple[str, str]]:
    """(role, text) of every chat bubble, the reply's '— why it ended' note left out."""
    rows = page.locator("#chatbot .message-row")
    shown = []
    for i in range(rows.count()):
        row = rows.nth(i)
        role = "user" if "user-row" in (row.get_attribute("class") or "") else "assistant"
        text = row.locator(".message-content").inner_text().strip()
        shown.append((role, re.sub(r"\s*— [^—]*$", "", text).strip() if role == "assistant" else text))
    return shown


def given_history(messages: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"].strip()) for m in messages if m["role"] != "system"]


@pytest.mark.parametrize("width,height", [(1400, 900), (1280, 800), (1024, 768), (390, 844)])
def test_layout_at_each_window_size(tiny, browser, width, height):
    url, _ = tiny
    with opened(browser, url, width, height) as page:
        send(page, "hello")
        wait_done(page)
        page.evaluate("() => window.scrollTo(0, 0)")
        assert page.evaluate("() => document.documentElement.scrollWidth") <= width  # nothing sticks out
        assert_placeholder_fits(page, "#msg textarea")
        chat, tree = box(page, "#chatbot"), box(page, "#tree-panel")
        if width >= 1280:  # the point of the app, without scrolling
            assert_in_view(page, width, height, "#chatbot", "#tree-panel", "#stats", ".tree-legend", "#how-to-read")
        elif width >= 1000:  # side by side, the sidebar open
            assert tree["x"] >= chat["x"] + chat["width"] and box(page, ".sidebar")["x"] >= 0
        else:  # a phone: the sidebar starts closed; chat, then the tree, then the example prompts
            bar = box(page, ".sidebar")
            assert bar["x"] + bar["width"] <= 0, f"the settings sidebar covers the page: {bar}"
            assert_in_view(page, width, height, "#msg", "#send", "#stop")
            assert tree["y"] >= chat["y"] + chat["height"]
        examples = page.get_by_text("Example prompts").first.bounding_box()
        assert examples["y"] >= tree["y"] + tree["height"]  # the tree never drops below the examples
        page.get_by_role("tab", name="Compare").click()
        for dropdown in ("#method-a input", "#method-b input"):
            clipped = page.evaluate(CLIPPED, dropdown)
            assert not clipped, f"{dropdown} truncates {page.input_value(dropdown)!r} at {width} px"


def test_how_to_read_and_the_tree_values_are_one_click_away(tiny, browser):
    url, _ = tiny
    with opened(browser, url, 1280, 800) as page:
        note = page.inner_text("#tree-note")
        assert "12 tokens, depth 4, top-k 4" in note and "5 tokens, depth 2, top-k 3" in note
        page.click("#how-to-read button")
        page.locator("#how-to-read").get_by_text("Each cycle", exact=False).wait_for(timeout=10_000)  # it opens
        text = page.inner_text("#how-to-read")
        for term in ("Each cycle", "Accepted path", "Bonus token", "τ", "verify ms/cycle", "␣"):
            assert term in text, term


def test_an_out_of_range_number_is_named_and_still_switches_the_tree(tiny, browser):
    """The page puts the nearest end of the range in the box; a message names the field, range, value."""
    url, given = tiny
    with opened(browser, url, 1280, 800) as page:
        set_slider(page, "temperature", "5")
        said = "Temperature must be between 0 and 2, got 5; it is set to 2"
        page.locator(".toast-body", has_text=said).first.wait_for(timeout=15_000)
        page.wait_for_function("() => document.querySelector('#tree-total input[type=number]').value == '5'")
        count = len(given)
        send(page, "hello")
        wait_done(page)
        assert slider_value(page, "temperature") == "2" and len(given) > count  # it ran, at 2
        assert slider_value(page, "tree-total") == "5"  # still the sampling tree
        set_slider(page, "max-new", "100000")
        said = "Max new tokens must be between 1 and 2048, got 100000; it is set to 2048"
        page.locator(".toast-body", has_text=said).first.wait_for(timeout=15_000)


def test_clear_while_streaming_stays_cleared_and_the_next_send_works(tiny, browser):
    url, given = tiny
    with opened(browser, url, 1280, 800) as page:
        send(page, "first question")
        page.locator("#chatbot .bot-row").first.wait_for(timeout=30_000)
        page.click("#clear")
        time.sleep(3 * SLOW_S)
        assert screen_history(page) == [], "the cleared turn came back"
        send(page, "second question")
        wait_reply(page, 1)
        assert "stopped" not in page.inner_text("#stats")
        shown = screen_history(page)
        assert [r for r, _ in shown] == ["user", "assistant"] and shown[0][1] == "second question"
        assert given_history(given[-1]) == [("user", "second question")]  # the model never saw the first
        send(page, "third question")
        wait_reply(page, 2)
        shown = screen_history(page)
        assert given_history(given[-1]) == shown[:-1]  # what the model is given is what the page shows


def stop_while_waiting(waiting, streaming) -> None:
    """Stop `waiting`'s request while it waits for the engine behind `streaming`'s reply: it must leave at
    once, and the other reply must go on streaming."""
    waiting.wait_for_function("() => document.querySelector('#stats').innerText.includes('Waiting for the engine')")
    waiting.click("#stop")
    waiting.wait_for_function(
        "() => document.querySelector('#stats').innerText.includes('Stopped before it started')", timeout=5_000
    )
    assert "—" not in streaming.inner_text("#stats"), "the other reply should still be streaming"


def test_stop_takes_a_queued_request_out_of_the_line_at_once(tiny, browser):
    url, given = tiny
    with opened(browser, url, 1280, 800) as first, opened(browser, url, 1280, 800) as second:
        send(first, "a long reply please")
        first.locator("#chatbot .bot-row").first.wait_for(timeout=30_000)
        send(second, "me too")
        count = len(given)
        stop_while_waiting(second, first)
        assert second.input_value("#msg textarea") == "me too" and screen_history(second) == []
        wait_done(first)
        assert "stopped" not in first.inner_text("#stats") and len(given) == count


def test_the_compare_tabs_stop_never_stops_a_chat_reply(tiny, browser):
    url, _ = tiny
    with opened(browser, url, 1280, 800) as page:
        send(page, "keep going")
        page.locator("#chatbot .bot-row").first.wait_for(timeout=30_000)
        page.get_by_role("tab", name="Compare").click()
        page.click("#cmp-stop")
        page.get_by_role("tab", name="Chat").click()
        stats = wait_done(page)
        assert "stopped" not in stats and "stopped" not in page.inner_text("#chatbot")


def test_a_stopped_comparison_labels_its_panes_stopped(tiny, browser):
    url, _ = tiny
    with opened(browser, url, 1280, 800) as page:
        page.get_by_role("tab", name="Compare").click()
        page.fill("#cmp-prompt textarea", "compare these")
        page.click("#cmp-run")
        page.wait_for_function(
            "() => /running alone/.test(document.querySelector('#pane-a').innerText)", timeout=30_000
        )
        page.click("#cmp-stop")
        for pane in ("#pane-a", "#pane-b"):
            page.wait_for_function(f"() => /stopped/.test(document.querySelector('{pane} .pane-status').innerText)")
        time.sleep(1.0)
        for pane in ("#pane-a", "#pane-b"):
            assert page.inner_text(f"{pane} .pane-status") == "stopped"
        assert "stopped" in page.inner_text("#cmp-summary")


STREAMING = (  # a reply has text on screen and has not ended (before, the stats line ends '— <why>')
    "n => document.querySelectorAll('#chatbot .bot-row').length == n "
    "&& !document.querySelector('#stats').innerText.includes('—')"
)


def test_regenerate_then_stop_while_it_streams_brings_the_earlier_reply_back(tiny, browser):
    url, given = tiny
    with opened(browser, url, 1280, 800) as page:
        send(page, "tell me a story")
        wait_reply(page, 1)
        earlier = screen_history(page)
        count = len(given)
        page.click("#regenerate")
        page.wait_for_function(STREAMING, arg=1, timeout=30_000)
        assert len(given) > count, "the regeneration should be running"
        page.click("#stop")
        assert "stopped" in wait_done(page)
        time.sleep(3 * SLOW_S)  # nothing draws the stopped reply afterwards
        assert screen_history(page) == earlier, "the stopped regeneration replaced the earlier reply"
        assert "stopped" not in page.inner_text("#chatbot")
        send(page, "and then")
        wait_reply(page, 2)
        assert given_history(given[-1]) == screen_history(page)[:-1]  # what the model is given is on screen
        assert given_history(given[-1]) == earlier + [("user", "and then")]


def test_stop_takes_a_queued_regeneration_out_of_the_line_and_the_earlier_reply_is_back(tiny, browser):
    url, given = tiny
    with opened(browser, url, 1280, 800) as first, opened(browser, url, 1280, 800) as second:
        send(second, "a question")
        wait_reply(second, 1)
        earlier = screen_history(second)
        send(first, "a long reply please")
        first.locator("#chatbot .bot-row").first.wait_for(timeout=30_000)
        second.click("#regenerate")
        count = len(given)
        stop_while_waiting(second, first)
        assert screen_history(second) == earlier
        assert "earlier reply is back" in second.inner_text("#stats")
        assert second.input_value("#msg textarea") == ""  # its message is in the history, not back in the box
        wait_done(first)
        assert "stopped" not in first.inner_text("#stats") and len(given) == count  # it never reached the model
        send(second, "and then")
        wait_reply(second, 2)
        assert given_history(given[-1]) == earlier + [("user", "and then")] == screen_history(second)[:-1]
