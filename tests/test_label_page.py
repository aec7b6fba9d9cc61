"""The labelling page in a real browser (headless Chromium through chromedriver): three prompts ranked with the
keyboard alone, the server killed and started again, the page back at the fourth prompt with exactly three
rankings on disk; model output with script and markup shown as text, running nothing; the token required.

Needs Debian's `chromium` and `chromium-driver` (`make browser` installs them; .ci/run calls it). Without them the
test is skipped, unless RLHF_REQUIRE_BROWSER=1 (CI) makes that a failure."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
SCREENSHOT = ROOT / "docs" / "labelling.png"

if not (CHROMIUM and DRIVER):
    if os.environ.get("RLHF_REQUIRE_BROWSER") == "1":
        raise RuntimeError("chromium and chromedriver are required (apt-get install chromium chromium-driver)")
    pytest.skip("no chromium / chromedriver (apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

XSS = ["<script>window.__pwned = 1</script>The answer is 8.", '<img src=x onerror="window.__pwned = 2">maybe 9.',
       "I do not know. <b>bold?</b>"]
CANDIDATES = [
    {"prompt": "What is 2 + 3?", "responses": ["maybe 6.", "The answer is 5.", "Let me think. 2 plus 3 makes 5."]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: 3 1 2"}],
     "responses": ["The answer is 1 2 3.", "3 1 2", "The answer is 1 2 3."]},
    {"prompt": "Reverse the words: dog cow owl", "responses": ["owl cow dog", "The answer is owl cow dog.", "dog"]},
    {"prompt": "What is 4 + 4? <i>not italic</i>", "responses": XSS},
    {"prompt": "How many times does hen appear in: hen dog hen owl?",  # a tiny-world task, as the docs show it
     "responses": ["Let me think. Counting each word that is hen: 2. So the answer is 2.", "The answer is 2.",
                   "I am not sure, but maybe 3.", "The answer is 1."]},
]


def start(candidates: Path, out: Path, annotator: str = "alice", *more: str) -> tuple[subprocess.Popen, str]:
    """`rlhf label serve` as a real process; its URL from the line it prints."""
    proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "label", "serve", str(candidates), "--out", str(out),
                             "--annotator", annotator, "--port", "0", *more], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("http://"):
            return proc, line.strip()
    raise AssertionError(f"no URL printed: {proc.stderr.read()}")


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1000",
                "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def keys(driver, *pressed):
    chain = ActionChains(driver)
    for k in pressed:
        chain.send_keys(k)
    chain.perform()


def shown_prompt(driver) -> str:
    return driver.find_element(By.ID, "conversation").text


def wait_for_prompt(driver, text: str) -> None:
    WebDriverWait(driver, 10).until(lambda d: text in shown_prompt(d))


def test_rank_by_keyboard_kill_restart_and_nothing_runs(browser, tmp_path):
    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text("".join(json.dumps(r) + "\n" for r in CANDIDATES))
    out = tmp_path / "rankings.jsonl"
    server, url = start(candidates, out)
    try:
        browser.get(url)
        # prompt 1: 2 is best, then 1; 3 is left and placed last without a key
        wait_for_prompt(browser, "What is 2 + 3?")
        keys(browser, "2", "1", Keys.ENTER)
        # prompt 2 (a conversation with a system turn): 1 best, then 3 tied with it; 2 last
        wait_for_prompt(browser, "Sort: 3 1 2")
        assert "Be brief." in shown_prompt(browser)
        keys(browser, "1", "=", "3", Keys.ENTER)
        # prompt 3: a slip undone with Backspace
        wait_for_prompt(browser, "Reverse the words")
        keys(browser, "3", Keys.BACKSPACE, "2", "1", Keys.ENTER)
        wait_for_prompt(browser, "What is 4 + 4?")
        assert browser.find_element(By.ID, "progress").text.startswith("3 / 5 answered")
    finally:
        server.send_signal(signal.SIGKILL)  # no clean shutdown: what was confirmed must already be on disk
        server.wait()

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["ranking"] for r in rows] == [[1, 0, 2], [0, 1, 0], [1, 0, 2]]
    assert [r["label"]["item"] for r in rows] == [0, 1, 2]
    assert all(r["label"]["annotator"] == "alice" and r["label"]["status"] == "ranked" for r in rows)

    server, url = start(candidates, out)
    try:
        browser.get(url)
        wait_for_prompt(browser, "What is 4 + 4?")  # the page opens at the fourth prompt
        assert browser.find_element(By.ID, "progress").text.startswith("3 / 5 answered")
        # model output (and a prompt) holding markup and script: literal text, nothing ran, no element made
        cards = browser.find_elements(By.CSS_SELECTOR, "#responses .response .text")
        assert [c.text for c in cards] == [x.strip() for x in XSS]
        assert "<i>not italic</i>" in shown_prompt(browser)
        assert browser.execute_script("return window.__pwned") is None
        assert not browser.find_elements(By.CSS_SELECTOR, "#responses script, #responses img, #responses b, "
                                                          "#conversation i")
        keys(browser, "s")  # skipped: recorded, ranks nothing
        wait_for_prompt(browser, "How many times does hen appear")
        keys(browser, "2", "1")  # two placed so far: the picture shows a ranking in progress
        browser.set_window_size(1100, 640)
        browser.save_screenshot(str(tmp_path / "labelling.png"))
        if os.environ.get("RLHF_SAVE_SCREENSHOT") == "1":  # how docs/labelling.png was made
            shutil.copy(tmp_path / "labelling.png", SCREENSHOT)
        # a request without the token is refused
        base = url.split("?")[0]
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "api/next")
        assert e.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base)
        assert e.value.code == 401
    finally:
        server.terminate()
        server.wait()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"]["status"] for r in rows] == ["ranked"] * 3 + ["skipped"]


def test_overlap_gives_two_annotators_their_own_queues(browser, tmp_path):
    """Two annotators at once, a server each on one rankings file. With --overlap 1 every prompt is answered once
    and neither is shown what the other answered; with --overlap 2 each is shown first what nobody has answered,
    and every prompt ends with both answers. Each page says when its annotator's queue is empty."""
    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text("".join(json.dumps(r) + "\n" for r in CANDIDATES[:3]))
    prompts = ["What is 2 + 3?", "Sort: 3 1 2", "Reverse the words"]

    def answer_next(url: str) -> int:
        browser.get(url)  # the page asks for this annotator's next prompt
        WebDriverWait(browser, 10).until(lambda d: any(p in shown_prompt(d) for p in prompts))
        shown = next(i for i, p in enumerate(prompts) if p in shown_prompt(browser))
        keys(browser, "1", "2", Keys.ENTER)
        WebDriverWait(browser, 10).until(lambda d: prompts[shown] not in shown_prompt(d))  # saved, moved on
        return shown

    (tmp_path / "longest.py").write_text("def score(prompts, responses):\n"
                                         "    return [float(len(r)) for r in responses]\n")
    suggest = ["--suggest", f"{tmp_path / 'longest.py'}:score"]  # alice sees a suggestion at overlap 2, bob never
    for overlap in (1, 2):
        out = tmp_path / f"rankings-{overlap}.jsonl"
        servers = {name: start(candidates, out, name, "--overlap", str(overlap),
                               *(suggest if name == "alice" and overlap == 2 else [])) for name in ("alice", "bob")}
        try:
            if overlap == 2:
                browser.get(servers["alice"][1])
                WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".suggestion"))
                shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".suggestion")]
                assert all("longest.py:score suggests #" in t for t in shown) and len(shown) == 3
            order = [(name, answer_next(servers[name][1])) for name in ["alice", "bob", "alice", "bob", "alice",
                                                                        "bob"][:3 * overlap]]
            for _, url in servers.values():
                browser.get(url)
                WebDriverWait(browser, 10).until(lambda d: "Thank you" in shown_prompt(d))
                assert " 0 left for you" in browser.find_element(By.ID, "progress").text
            assert browser.find_element(By.ID, "progress").text.startswith(
                f"3 / 3 with {overlap} answer{'s' if overlap > 1 else ''}")
        finally:
            for server, _ in servers.values():
                server.terminate()
                server.wait()
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [(r["label"]["annotator"], r["label"]["item"]) for r in rows] == order
        if overlap == 1:
            assert sorted(item for _, item in order) == [0, 1, 2]
        else:
            assert order[1][1] != order[0][1]  # bob starts on a prompt alice has not answered
            assert order[2][1] not in (order[0][1], order[1][1])  # then alice on the one nobody has
            for name in ("alice", "bob"):
                assert sorted(item for who, item in order if who == name) == [0, 1, 2]
            assert all(("suggestion" in r["label"]) == (r["label"]["annotator"] == "alice") for r in rows)


def test_episodes_show_their_calls_and_results_and_rank_like_responses(browser, tmp_path):
    """Candidates of ``rlhf sample --env`` (each response a whole episode): the page shows each call as
    name(arguments), each result, then the answer, all as text; the ranking written is one the reward model
    reads, episodes and tools kept."""
    from rlhf.text import formats
    from rlhf.tiny.environments import schemas

    def episode(a, b, result, answer):
        return [{"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}]},
            {"role": "tool", "name": "add", "content": result}, {"role": "assistant", "content": answer}]

    row = {"prompt": "What is 37 + 48?", "env": "tiny:calculator", "tools": schemas(), "responses": [
        episode(16, 14, "30", "The answer is 30."), episode(37, 48, "85", "The answer is 85."),
        [{"role": "assistant", "content": "The answer is 84."}],
        episode(37, 48, "<img src=x onerror=\"window.__pwned = 3\">", "maybe 85.")]}
    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text(json.dumps(row) + "\n")
    out = tmp_path / "rankings.jsonl"
    server, url = start(candidates, out)
    try:
        browser.get(url)
        wait_for_prompt(browser, "What is 37 + 48?")
        cards = browser.find_elements(By.CSS_SELECTOR, "#responses .response .body")
        assert [c.text.splitlines() for c in cards] == [
            ["→ calls add(a=16, b=14)", "← add returned: 30", "The answer is 30."],
            ["→ calls add(a=37, b=48)", "← add returned: 85", "The answer is 85."],
            ["The answer is 84."],
            ["→ calls add(a=37, b=48)", '← add returned: <img src=x onerror="window.__pwned = 3">', "maybe 85."]]
        assert browser.execute_script("return window.__pwned") is None
        assert not browser.find_elements(By.CSS_SELECTOR, "#responses img")
        keys(browser, "2", "4", "3", Keys.ENTER)
        WebDriverWait(browser, 10).until(lambda d: "Every prompt is answered" in shown_prompt(d))
    finally:
        server.terminate()
        server.wait()
    ranked = formats.load(str(out), "ranking").rows
    assert len(ranked) == 1 and ranked[0]["ranks"] == [3, 0, 2, 1]
    assert ranked[0]["responses"][1] == row["responses"][1] and ranked[0]["tools"] == schemas()
