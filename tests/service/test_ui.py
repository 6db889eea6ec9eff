"""GET /ui, the playground, in a real browser: Debian's chromium (`make deps-system`) driven headless by
Playwright (pinned in requirements.txt; its own browser download is not used) against the real
`bentoml serve` with the tiny preset and SPO_API_TOKEN set (tests/server.py's standard server). The page
loads without a token and without console errors, takes its bounds from /docs.json and its adapters from
/info, streams a generation (queued, every step with its ETA and latent preview) to a PNG whose bytes equal
/generate's for the same body, frees the slot when cancelled, and shows the server's error next to the
field it names. Writes benchmarks/results/ui.png, the README's screenshot."""

from __future__ import annotations

import io
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from server import API_TOKEN, ROOT

pytestmark = pytest.mark.server
TOKEN = API_TOKEN  # the standard server's (tests/server.py)
SCREENSHOT = ROOT / "benchmarks" / "results" / "ui.png"
CONTROLS = ["prompt", "negative_prompt", "seed", "seed-random", "num_inference_steps", "guidance_scale", "best_of", "scheduler",
            "width", "height", "adapter", "lora_scale", "init_image", "preview", "generate"]

# Every control, link and button of the page without an accessible name (a <label>, aria-label or text).
UNLABELLED = """() => [...document.querySelectorAll("input, select, textarea, button, a")]
    .filter((el) => !((el.labels && el.labels.length) || el.getAttribute("aria-label")
                      || (["BUTTON", "A"].includes(el.tagName) && el.textContent.trim())))
    .map((el) => el.outerHTML.slice(0, 80))"""

# What the run cards showed, in order: each status text set, each old value of a progress bar (the value
# before each step's update), each latent preview's src (its start).
OBSERVE = """() => {
    window.seen = {status: [], progress: [], preview: []};
    new MutationObserver((records) => { for (const r of records) {
        if (r.type === "attributes" && r.target.tagName === "PROGRESS") window.seen.progress.push(r.oldValue);
        else if (r.type === "attributes" && r.target.classList.contains("run-preview") && r.attributeName === "src")
            window.seen.preview.push((r.target.getAttribute("src") || "").slice(0, 22));
        else if (r.type === "childList" && r.target.classList.contains("run-status"))
            for (const n of r.addedNodes) window.seen.status.push(n.textContent);
    } }).observe(document.getElementById("runs"), {subtree: true, childList: true, attributes: true,
                                                     attributeOldValue: true, attributeFilter: ["value", "src"]});
}"""


@pytest.fixture(scope="module")
def server(standard_server):
    return standard_server


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium not found: `make deps-system` installs Debian's (package chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: the tests run as root in CI, where chromium's sandbox refuses to start
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.errors = []  # console errors and uncaught exceptions
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(f"uncaught: {e}"))
    response = page.goto(server.url + "/ui")
    assert response.status == 200 and response.headers["content-type"].startswith("text/html")
    page.wait_for_selector("body[data-ready=true]")
    yield page
    context.close()


def stream_schema(server) -> dict:
    doc = httpx.get(server.url + "/docs.json", timeout=30).json()
    return doc["paths"]["/generate/stream"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]


def engine(server) -> dict:
    return httpx.get(server.url + "/info", timeout=10).json()["engine"]


def set_token(page, token=TOKEN):
    page.click("#auth summary")
    page.fill("#token", token)


def test_page_loads_open_with_the_servers_bounds_labelled_and_keyboard_reachable(server, page):
    assert page.errors == []
    for path, media in [("/ui", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")]:
        r = httpx.get(server.url + path, timeout=10)  # no token: open like /docs.json
        assert r.status_code == 200 and r.headers["content-type"].startswith(media), path
    r = httpx.get(server.url + "/ui/../service/ui.py", timeout=10)
    assert r.status_code == 404 and set(r.json()) == {"error", "status", "detail"}
    r = httpx.get(server.url + "/ui/index.htm", timeout=10)
    assert r.status_code == 404 and r.json()["detail"][0]["loc"] == ["path"]
    # bounds from /docs.json's stream body, adapters and defaults from /info
    props = stream_schema(server)
    width = next(b for b in props["width"]["anyOf"] if b["type"] == "integer")
    for side in ("width", "height"):
        assert page.eval_on_selector(f"#{side}", "e => [e.min, e.max, e.step]") == \
            [str(width["minimum"]), str(width["maximum"]), str(width["multipleOf"])]
    assert (width["minimum"], width["maximum"]) == (32, 256)  # the tiny preset's range, not the widest
    steps = props["num_inference_steps"]
    assert page.eval_on_selector("#num_inference_steps", "e => [e.min, e.max]") == [str(steps["minimum"]), str(steps["maximum"])]
    assert page.eval_on_selector_all("#scheduler option", "os => os.map(o => o.value)") == props["scheduler"]["enum"]
    info = httpx.get(server.url + "/info", timeout=10).json()
    assert page.eval_on_selector_all("#adapter option", "os => os.map(o => o.value)") == \
        [""] + [a["name"] for a in info["adapters"]]
    assert float(page.input_value("#lora_scale")) == info["default_lora_scale"]
    assert page.input_value("#width") == str(info["default_size"])
    assert info["preset"] in page.text_content("#server") and "running 0, waiting 0" in page.text_content("#server")
    best_of = props["best_of"]
    assert page.eval_on_selector("#best_of", "e => [e.min, e.max, e.value]") == [str(best_of["minimum"]), str(best_of["maximum"]), "1"]
    assert page.text_content("#best_of-hint").startswith(f"{best_of['minimum']}–{best_of['maximum']}")
    assert page.evaluate(UNLABELLED) == []
    # every control in the tab order
    page.focus("body")
    reached = []
    for _ in range(40):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("document.activeElement.id"))
    assert set(CONTROLS) <= set(reached), set(CONTROLS) - set(reached)
    assert page.is_disabled("#strength")  # until an init image is chosen
    for w in (360, 600, 1024, 1920):
        page.set_viewport_size({"width": w, "height": 900})
        assert page.evaluate("document.documentElement.scrollWidth") <= w, w
    assert page.errors == []


def test_a_generation_streams_progress_and_downloads_the_servers_png(server, page):
    set_token(page)
    page.fill("#seed", "7")
    page.fill("#num_inference_steps", "4")
    page.check("#preview")
    page.evaluate(OBSERVE)
    with page.expect_request(lambda r: r.url.endswith("/generate/stream")) as sent:
        page.focus("#prompt")
        page.keyboard.press("Control+Enter")  # the keyboard's way to generate
    request = sent.value
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    body = request.post_data_json
    assert body["seed"] == 7 and body["num_inference_steps"] == 4 and body["preview"] is True
    page.wait_for_selector("#gallery li")
    seen = page.evaluate("window.seen")
    assert seen["status"][1].startswith("queued: ")  # after "sending…"
    steps = [s for s in seen["status"] if s.startswith("step ")]
    assert [s.split(" · ")[0] for s in steps] == [f"step {i}/4" for i in range(1, 5)], seen["status"]
    assert all(re.fullmatch(r"step \d/4 · ETA \d+(\.\d)? s", s) for s in steps) and steps[-1].endswith("ETA 0 s")
    assert [float(v) for v in seen["progress"]] == [0, 0.25, 0.5, 0.75]  # each step's update, from 0 to 1
    assert seen["preview"] and all(p == "data:image/png;base64," for p in seen["preview"])
    assert page.query_selector("#runs li") is None and page.is_visible("#runs-empty")
    # the download is the server's PNG, byte for byte: /generate's answer to the same body
    with page.expect_download() as dl:
        page.click("#gallery li .download")
    png = Path(dl.value.path()).read_bytes()
    assert dl.value.suggested_filename.startswith("spo-7-") and dl.value.suggested_filename.endswith(".png")
    direct = httpx.post(server.url + "/generate", json={k: v for k, v in body.items() if k != "preview"},
                        headers={"authorization": f"Bearer {TOKEN}"}, timeout=120)
    assert direct.status_code == 200 and direct.headers["x-seed"] == "7"
    assert png == direct.content
    params = Image.open(io.BytesIO(png)).info["parameters"]
    assert "Steps: 4" in params and "Seed: 7" in params and "Size: 64x64" in params
    assert page.eval_on_selector("#gallery li img", "i => [i.naturalWidth, i.naturalHeight]") == [64, 64]
    assert page.text_content("#gallery li").count("7") >= 1 and "ddim" in page.text_content("#gallery li .params")
    # a click on the result puts its parameters back, the seed fixed
    page.check("#seed-random")
    page.fill("#num_inference_steps", "30")
    page.click("#gallery li .reuse")
    assert not page.is_checked("#seed-random") and page.input_value("#seed") == "7"
    assert page.input_value("#num_inference_steps") == "4"
    # the token lives in this tab's sessionStorage only
    assert page.evaluate("[sessionStorage.getItem('spo-serve.token'), localStorage.length, document.cookie]") == [TOKEN, 0, ""]
    assert page.evaluate(UNLABELLED) == []
    for w in (360, 1920):
        page.set_viewport_size({"width": w, "height": 900})
        assert page.evaluate("document.documentElement.scrollWidth") <= w, w
    page.set_viewport_size({"width": 1280, "height": 900})
    assert page.errors == []
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_img2img_sends_the_chosen_file_and_strength(server, page):
    set_token(page)
    buf = io.BytesIO()
    Image.radial_gradient("L").resize((72, 48)).convert("RGB").save(buf, format="PNG")
    page.set_input_files("#init_image", files=[{"name": "init.png", "mimeType": "image/png", "buffer": buf.getvalue()}])
    page.wait_for_selector("#init-preview:not([hidden])")
    assert page.is_enabled("#strength")
    page.fill("#strength", "0.5")
    page.fill("#num_inference_steps", "4")
    page.fill("#width", "")
    page.fill("#height", "")  # the init image's size
    with page.expect_request(lambda r: r.url.endswith("/generate/stream")) as sent:
        page.click("#generate")
    body = sent.value.post_data_json
    assert body["strength"] == 0.5 and body["init_image"].startswith("data:image/png;base64,")
    assert "width" not in body and "height" not in body
    page.wait_for_selector("#gallery li")
    assert page.eval_on_selector("#gallery li img", "i => [i.naturalWidth, i.naturalHeight]") == [72, 48]
    with page.expect_download() as dl:
        page.click("#gallery li .download")
    direct = httpx.post(server.url + "/generate", json={k: v for k, v in body.items() if k != "preview"},
                        headers={"authorization": f"Bearer {TOKEN}"}, timeout=120)
    assert direct.status_code == 200 and Path(dl.value.path()).read_bytes() == direct.content
    assert "Denoising strength: 0.5" in Image.open(io.BytesIO(direct.content)).info["parameters"]
    page.click("#init-clear")
    assert page.is_hidden("#init-preview") and page.is_disabled("#strength")
    assert page.errors == []


def test_cancel_aborts_the_stream_and_frees_the_slot(server, page):
    set_token(page)
    page.fill("#num_inference_steps", "100")
    page.click("#generate")
    page.wait_for_function("() => /^step \\d+\\/100/.test(document.querySelector('#runs .run-status')?.textContent)")
    assert engine(server)["running"] == 1
    page.get_by_role("button", name=re.compile("^Cancel #1 ")).click()
    page.wait_for_function("() => document.querySelector('#runs .run-status').textContent === 'cancelled'")
    t0 = time.time()
    while time.time() - t0 < 30:
        stats = engine(server)
        if stats["running"] == 0 and stats["waiting"] == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the slot was not freed: {stats}")
    assert page.query_selector("#gallery li") is None
    page.get_by_role("button", name=re.compile("^Dismiss #1 ")).click()
    assert page.query_selector("#runs li") is None
    assert page.errors == []


def test_errors_show_the_field_and_message(server, page):
    page.fill("#num_inference_steps", "0")
    page.click("#generate")  # no token yet: the token field says so
    page.wait_for_selector("#authorization-error:not([hidden])")
    assert "authorization: a valid 'Authorization: Bearer <SPO_API_TOKEN>' header is required" in \
        page.text_content("#authorization-error")
    assert page.is_visible("#token") and page.get_attribute("#token", "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "token"
    page.fill("#token", TOKEN)
    page.click("#generate")
    page.wait_for_selector("#num_inference_steps-error:not([hidden])")
    assert page.text_content("#num_inference_steps-error") == "num_inference_steps: must be in 1..100, got 0"
    assert page.get_attribute("#num_inference_steps", "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "num_inference_steps"
    assert page.is_hidden("#authorization-error") and page.get_attribute("#token", "aria-invalid") is None
    assert page.text_content("#form-error") == "400: num_inference_steps: must be in 1..100, got 0"
    assert "must be in 1..100, got 0" in page.text_content("#runs li.failed .run-status")
    page.fill("#num_inference_steps", "2")
    page.fill("#width", "33")  # the browser does not stop it (novalidate): the server's message is shown
    page.fill("#height", "")  # "" is the preset's default
    page.click("#generate")
    page.wait_for_selector("#width-error:not([hidden])")
    assert page.text_content("#width-error") == "width: must be a multiple of 8 in 32..256, got 33"
    assert page.is_hidden("#num_inference_steps-error")
    # the only console errors: the browser's line for each refused request (401, 400, 400)
    assert len(page.errors) == 3 and all("Failed to load resource" in e for e in page.errors), page.errors
    assert engine(server)["running"] == 0


def test_best_of_is_sent_and_its_score_shown(server, page):
    set_token(page)
    page.fill("#seed", "3")
    page.fill("#num_inference_steps", "2")
    page.fill("#best_of", "2")
    with page.expect_request(lambda r: r.url.endswith("/generate/stream")) as sent:
        page.click("#generate")
    body = sent.value.post_data_json
    assert body["best_of"] == 2 and body["seed"] == 3
    page.wait_for_selector("#gallery li")
    params = page.text_content("#gallery li .params")
    shown = re.search(r"best of\s*2 \(score (-?\d+\.\d{3})\)", params)
    assert shown, params
    # the server's answer to the same body names the same candidate count and a score
    direct = httpx.post(server.url + "/generate", json={k: v for k, v in body.items() if k != "preview"},
                        headers={"authorization": f"Bearer {TOKEN}"}, timeout=120)
    assert direct.status_code == 200 and direct.headers["x-best-of"] == "2", direct.text
    # the same candidates' score (within the page's 3 decimals; another batch may move the last bits)
    assert abs(float(direct.headers["x-preference-score"]) - float(shown.group(1))) <= 2e-3, (direct.headers, params)
    page.fill("#best_of", "1")
    assert page.errors == []
