"""The web playground (/ui) in a real headless browser: Debian's chromium driven by Playwright, against
real servers with API keys off and on, under the page's own Content-Security-Policy. What the page shows
is checked against the same request made through the API, and its JSON against the `jsonschema` package.
The browser tests skip, saying why, where playwright or chromium is missing (`make test` installs both
where apt-get can). LORASERVE_UI_SCREENSHOTS=docs writes the README's screenshots (`make screenshots`)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

import httpx
import jsonschema
import pytest

from server.api.ui import is_page_request
from tests.conftest import ROOT, ServerProcess, wait_until

KEY = "ui-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "What is machine learning?"
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
PERSON = {"type": "object", "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0,
                                                                            "maximum": 120}}}
SLOW = 120_000  # ms: a generation on a busy 2-core machine

# the base model and every adapter shipped in adapters_cache/ (the demos)
MODEL_OPTIONS = 1 + len(list((ROOT / "adapters_cache").glob("*/*/adapter_config.json")))


# -- servers, browser, page -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(loaded) -> Iterator[dict[str, ServerProcess]]:
    """One server without API keys, one with; started together (`loaded` converted the model first)."""
    started = {"open": ServerProcess("--max-batch-size", "4"),
               "keyed": ServerProcess("--max-batch-size", "4", "--api-key", KEY)}
    try:
        yield {name: proc.wait_ready() for name, proc in started.items()}
    finally:
        for proc in started.values():
            proc.stop()


@pytest.fixture(scope="module")
def open_server(servers) -> ServerProcess:
    return servers["open"]


@pytest.fixture(scope="module")
def keyed_server(servers) -> ServerProcess:
    return servers["keyed"]


def chromium_path() -> str | None:
    candidates = (os.environ.get("LORASERVE_CHROMIUM"), "/usr/lib/chromium/chromium",  # Debian's binary
                  shutil.which("chromium"), shutil.which("chromium-browser"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install -e '.[test]'")
    path = chromium_path()
    if path is None:
        pytest.skip("no chromium: `make test` installs Debian's chromium where apt-get can (root); "
                    "or install it yourself, or point LORASERVE_CHROMIUM at a Chromium binary")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path)
        yield browser
        browser.close()


@pytest.fixture
def new_page(browser):
    """Pages in fresh contexts (own sessionStorage), 1400x900; fails the test on any script error."""
    contexts, errors = [], []

    def make(url: str):
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: m.type == "error" and "401" not in m.text and errors.append(m.text))
        page.goto(url + "/ui")
        return page

    yield make
    for context in contexts:
        context.close()
    assert not errors, errors


@pytest.fixture
def page(new_page, open_server):
    page = new_page(open_server.url)
    expect(page.locator("#model-a option")).to_have_count(MODEL_OPTIONS)
    return page


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    where = os.environ.get("LORASERVE_UI_SCREENSHOTS")
    return ROOT / where if where else tmp_path_factory.mktemp("ui-screenshots")


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


# -- what the page does, as a user would ------------------------------------------------------------
def set_sampling(page, max_tokens: int) -> None:
    page.click("summary:has-text('Sampling')")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", str(max_tokens))


def run(page, panes: str = "a") -> None:
    page.click("#run")
    for pane in panes:
        expect(page.locator(f"#pane-{pane}")).to_have_attribute("data-state", re.compile("done|error"), timeout=SLOW)
        assert page.get_attribute(f"#pane-{pane}", "data-state") == "done", page.text_content(f"#pane-{pane}")


def reply(page, pane: str = "a") -> str:
    return page.locator(f"#pane-{pane} .msg.assistant").last.text_content()


def pane_number(page, pane: str, name: str) -> float:
    return float(page.get_attribute(f"#pane-{pane}", f"data-{name}"))


def chat_reference(url: str, model: str, max_tokens: int, headers: dict | None = None) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
            "max_tokens": max_tokens}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers or {}, timeout=SLOW / 1000)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def base_model(url: str, headers: dict | None = None) -> str:
    return httpx.get(url + "/info", headers=headers or {}, timeout=30).json()["model_id"]


def shot(page, shots: Path, name: str) -> None:
    page.screenshot(path=shots / f"ui-{name}.png")


# -- the route, without a browser -----------------------------------------------------------------------
@pytest.mark.parametrize("method, path, accept, public", [
    ("GET", "/ui", "", True),
    ("HEAD", "/ui", "", True),
    ("GET", "/", BROWSER_ACCEPT, True),
    ("GET", "/", "*/*", False),                   # curl: the API's answer, behind the key like every route
    ("GET", "/", "application/json", False),
    ("POST", "/", BROWSER_ACCEPT, False),         # lorax-client's generate route
    ("POST", "/ui", BROWSER_ACCEPT, False),
    ("GET", "/ui/", BROWSER_ACCEPT, False),
    ("GET", "/v1/models", BROWSER_ACCEPT, False),
    ("GET", "/metrics", BROWSER_ACCEPT, False),
])
def test_only_the_static_page_is_public(method, path, accept, public):
    scope = {"method": method, "path": path, "headers": [(b"accept", accept.encode())] if accept else []}
    assert is_page_request(scope) is public


def test_the_page_is_served_offline_and_root_keeps_its_api_answers(open_server):
    url = open_server.url
    page = httpx.get(url + "/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "http" not in csp
    assert not re.search(r"https?://", page.text), "the page must load nothing from elsewhere"
    assert len(page.text.splitlines()) < 800, "small enough to read in one sitting"
    assert httpx.get(url + "/", headers={"accept": BROWSER_ACCEPT}).text == page.text
    assert httpx.head(url + "/ui").status_code == 200
    for accept in ("*/*", "application/json"):  # as before the page existed
        r = httpx.get(url + "/", headers={"accept": accept})
        assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed", "error_type": "method_not_allowed"}
    r = httpx.post(url + "/", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}}, timeout=SLOW / 1000)
    assert r.status_code == 200 and isinstance(r.json(), list)
    paths = httpx.get(url + "/openapi.json").json()["paths"]
    assert "/ui" not in paths and "get" not in paths.get("/", {})


def test_with_keys_the_page_is_public_and_every_api_call_needs_the_key(keyed_server):
    url = keyed_server.url
    assert httpx.get(url + "/ui").status_code == 200
    assert httpx.get(url + "/", headers={"accept": BROWSER_ACCEPT}).status_code == 200
    assert httpx.get(url + "/", headers={"accept": "*/*"}).status_code == 401
    for path in ("/info", "/adapters", "/v1/models", "/metrics"):
        assert httpx.get(url + path).status_code == 401, path
        assert httpx.get(url + path, headers=AUTH).status_code == 200, path
    r = httpx.post(url + "/", headers={"accept": BROWSER_ACCEPT}, json={"inputs": "Hi"})
    assert r.status_code == 401


# -- in the browser ----------------------------------------------------------------------------------------
def test_a_chat_reply_streams_with_its_timings(page, open_server):
    set_sampling(page, max_tokens=12)
    page.fill("#prompt", PROMPT)
    run(page)
    assert reply(page) == chat_reference(open_server.url, base_model(open_server.url), 12)
    assert pane_number(page, "a", "events") > 1  # arrived token by token, not in one piece
    assert pane_number(page, "a", "ttft-ms") > 0
    assert pane_number(page, "a", "first-at") < pane_number(page, "a", "done-at")
    assert re.search(r"TTFT \d+ ms · [\d.]+ tok/s · \d+ tokens", page.text_content("#pane-a .stats"))


def test_two_adapters_side_by_side_stream_at_once(page, open_server, shots):
    set_sampling(page, max_tokens=32)
    page.check("#compare")
    page.select_option("#model-a", "demo-pirate/1")
    page.select_option("#model-b", "demo-terse/1")
    page.fill("#prompt", PROMPT)
    run(page, "ab")
    for pane, adapter in (("a", "demo-pirate/1"), ("b", "demo-terse/1")):
        assert reply(page, pane) == chat_reference(open_server.url, adapter, 32), adapter
        assert page.text_content(f"#pane-{pane} .title") == adapter
    assert reply(page, "a") != reply(page, "b")
    # both were streaming at once: each had its first token before the other one finished
    assert pane_number(page, "a", "first-at") < pane_number(page, "b", "done-at")
    assert pane_number(page, "b", "first-at") < pane_number(page, "a", "done-at")
    page.click("summary:has-text('Sampling')")  # closed again, for the picture
    shot(page, shots, "playground")


def test_a_json_schema_reply_is_validated(page, open_server, shots):
    page.check("input[name=mode][value=raw]")
    set_sampling(page, max_tokens=32)
    page.click("summary:has-text('JSON schema')")
    page.check("#use-schema")
    page.fill("#schema", json.dumps(PERSON))
    prompt = "A person described as JSON:"
    page.fill("#prompt", prompt)
    run(page)
    result = page.locator("#pane-a .json-result")
    expect(result).to_have_attribute("data-valid", "true")
    assert "✓ valid JSON, matches the schema" in result.text_content()
    shown = json.loads(page.text_content("#pane-a .json-result pre"))
    jsonschema.validate(shown, PERSON)
    reference = httpx.post(open_server.url + "/generate", timeout=SLOW / 1000, json={"inputs": prompt, "parameters": {
        "temperature": 0, "max_new_tokens": 32, "response_format": {"type": "json_object", "schema": PERSON}}})
    assert shown == json.loads(reference.json()["generated_text"])
    shot(page, shots, "json")
    page.fill("#max_tokens", "3")  # cut short: the page says the reply is not JSON, and why
    run(page)
    expect(result).to_have_attribute("data-valid", "false")
    assert "max new tokens" in result.text_content()


def test_the_metrics_move_while_it_generates(page):
    chart = page.locator("#chart")
    expect(chart).to_have_attribute("data-samples", re.compile(r"[1-9]"), timeout=10_000)
    before = int(page.text_content("#m-generated"))
    set_sampling(page, max_tokens=8)
    run(page)
    generated = pane_number(page, "a", "events")
    wait_until(lambda: int(page.text_content("#m-generated")) >= before + generated, timeout=10)
    wait_until(lambda: float(chart.get_attribute("data-peak-tps")) > 0, timeout=10)
    assert re.fullmatch(r"\d+ of 4", page.text_content("#m-kv"))  # max_batch_size from /info


def test_the_adapters_view_loads_and_unloads(page, open_server, shots):
    def tiers(adapter: str) -> list[str]:
        listing = httpx.get(open_server.url + "/adapters").json()["adapters"]
        return next(a["tiers"] for a in listing if a["id"] == adapter)

    httpx.post(open_server.url + "/adapters/unload", json={"adapter_id": "demo-terse/1"})
    page.click("nav button[data-view=adapters]")
    row = page.locator("tr[data-adapter='demo-terse/1']")
    expect(row).to_have_attribute("data-tiers", "disk")
    row.locator("button", has_text="Load").click()
    expect(row).to_have_attribute("data-tiers", "cpu,disk")
    assert tiers("demo-terse/1") == ["cpu", "disk"]
    assert re.search(r"pbase\s*cpu\s*disk\s*8\s*[\d.]+ MB", row.text_content())  # rank 8, its size
    shot(page, shots, "adapters")
    row.locator("button", has_text="Unload").click()
    expect(row).to_have_attribute("data-tiers", "disk")
    assert tiers("demo-terse/1") == ["disk"]
    row.locator("button", has_text="Open in playground").click()
    expect(page.locator("#model-a")).to_have_value("demo-terse/1")


def test_with_keys_the_page_asks_for_one_and_sends_it(new_page, keyed_server, shots):
    page = new_page(keyed_server.url)
    sent = []
    page.on("request", lambda r: r.url.startswith(keyed_server.url) and "/ui" not in r.url
            and sent.append(r.headers.get("authorization")))
    expect(page.locator("#key-dialog")).to_be_visible()
    shot(page, shots, "auth")
    page.fill("#key-input", "not-the-key")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-error")).to_have_text("That key was refused.")
    page.fill("#key-input", KEY)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-dialog")).to_be_hidden()
    expect(page.locator("#model-a option")).to_have_count(MODEL_OPTIONS)
    set_sampling(page, max_tokens=8)
    page.fill("#prompt", PROMPT)
    run(page)
    assert reply(page) == chat_reference(keyed_server.url, base_model(keyed_server.url, AUTH), 8, AUTH)
    sent_after_key = sent[sent.index(f"Bearer {KEY}"):]
    assert sent_after_key and all(h == f"Bearer {KEY}" for h in sent_after_key)
    page.reload()  # the key lasts for the tab
    expect(page.locator("#model-a option")).to_have_count(MODEL_OPTIONS)
    expect(page.locator("#key-dialog")).to_be_hidden()



# -- the fine-tuning jobs view ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def jobs_server(loaded, tmp_path_factory) -> Iterator[ServerProcess]:
    """Its own home and adapters folder: the jobs here write versions."""
    work = tmp_path_factory.mktemp("ui-jobs")
    (work / "home").mkdir()
    (work / "adapters").mkdir()
    os.symlink(loaded.model_dir.parent, work / "home" / "models", target_is_directory=True)
    env = {"LORASERVE_HOME": str(work / "home"), "LORASERVE_ADAPTERS_DIR": str(work / "adapters"),
           "LORASERVE_TRAINING_THREADS": "1"}
    server = ServerProcess("--max-batch-size", "4", env=env).wait_ready()
    yield server
    server.stop()


def start_job(url: str, **params) -> dict:
    """A dataset through the SDK's pre-signed upload, a repo, then a job: the calls the SDK makes."""
    api = httpx.Client(base_url=url, timeout=60)
    if api.get("/v1/datasets/name/colours").status_code == 404:
        rows = "".join(json.dumps({"prompt": f"Colour {i}:", "completion": f" {['red', 'blue'][i % 2]}",
                                   "split": "evaluation" if i % 4 == 3 else "train"}) + "\n" for i in range(16))
        begun = api.post("/v2/datasets/upload", json={"fileName": "colours.jsonl", "mimeType": "text/plain"}).json()
        httpx.put(begun["presignedUrl"], content=rows.encode()).raise_for_status()
        api.put("/v2/datasets/upload", json={"name": "colours", "uploadToken": begun["uploadToken"]}).raise_for_status()
        api.post("/v2/repos", json={"name": "ui-jobs", "existsOk": True}).raise_for_status()
    job = api.post("/v2/finetuning/jobs", json={"params": {"rank": 4, "effective_batch_size": 4, **params},
                                                "dataset": "colours", "repo": "ui-jobs"})
    assert job.status_code == 200, job.text
    return job.json()


def test_the_jobs_view_follows_a_fine_tune(new_page, jobs_server, shots):
    page = new_page(jobs_server.url)
    page.click("nav button[data-view=jobs]")
    expect(page.locator("#jobs-empty")).to_be_visible()
    start_job(jobs_server.url, train_steps=6)
    row = page.locator("tr[data-job='ui-jobs/1']")
    expect(row).to_have_attribute("data-status", "completed", timeout=SLOW)
    expect(row).to_contain_text("6/6 steps")
    row.click()
    expect(page.locator("#job-detail")).to_be_visible()
    expect(page.locator("#loss-legend")).to_contain_text("over 6 steps")
    expect(page.locator("#loss-legend")).to_contain_text("validation loss")
    assert len(page.get_attribute("#loss-train", "points").split()) == 6  # one point per step
    history = httpx.get(f"{jobs_server.url}/v2/finetuning/jobs", timeout=30).json()["data"]["jobs"][0]
    assert history["progress"]["loss"] == pytest.approx(float(row.locator("td").nth(4).text_content()), abs=1e-4)
    shot(page, shots, "jobs")
    row.locator("button", has_text="Open in playground").click()
    expect(page.locator("#model-a")).to_have_value("ui-jobs/1")


def test_a_job_can_be_canceled_from_the_jobs_view(new_page, jobs_server):
    job = start_job(jobs_server.url, epochs=50)
    page = new_page(jobs_server.url)
    page.click("nav button[data-view=jobs]")
    row = page.locator(f"tr[data-job='ui-jobs/{job['targetVersionTag']}']")
    row.locator("button", has_text="Cancel").click()
    expect(row).to_have_attribute("data-status", "canceled", timeout=SLOW)
    status = httpx.get(f"{jobs_server.url}/v2/finetuning/jobs/{job['uuid']}", timeout=30).json()["status"]
    assert status == "canceled"
