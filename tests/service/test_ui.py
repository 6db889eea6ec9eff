"""GET /ui, the playground, in a real browser: Debian's chromium (`make deps-system`) driven headless by
Playwright (pinned in requirements-dev.txt; its own browser download is not used) against the real
`bentoml serve` with the tiny preset and SPO_API_TOKEN set (tests/server.py's standard server). The page
loads without a token and without console errors, asks nothing of any other origin nor of an admin route,
takes its bounds from /docs.json and its adapters from /info, labels every control, reaches each with Tab and
keeps its layout from 360 to 1920 px; it streams a generation (queued, every step with its ETA and latent
preview in one image) to a PNG whose bytes equal /generate's for the same body, with its parameters chunk;
a result puts back every parameter it was made with; cancel (button or Esc) frees the slot; the server's
error shows next to the field it names. Writes benchmarks/results/ui.png, the README's screenshot."""

from __future__ import annotations

import io
import re
import struct
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from conftest import system_tool
from server import API_TOKEN, ROOT

pytestmark = pytest.mark.server
TOKEN = API_TOKEN  # the standard server's (tests/server.py)
SCREENSHOT = ROOT / "benchmarks" / "results" / "ui.png"
FILES = ROOT / "service" / "ui"
CONTROLS = ["prompt", "negative_prompt", "seed", "seed-random", "num_inference_steps", "guidance_scale", "best_of",
            "scheduler", "width", "height", "adapter", "lora_scale", "init_image", "init-clear", "strength", "preview",
            "token", "generate"]
# everything the page may ask of the server (admin, training and evaluation routes are not among them)
PAGE_PATHS = {"/ui", "/ui/app.js", "/ui/style.css", "/docs.json", "/info", "/generate/stream"}
WIDTHS = (360, 768, 1280, 1920)

# Every control, link and button of the page without an accessible name: no <label> with text, aria-label or
# (a button, link or summary) text of its own.
UNLABELLED = """() => [...document.querySelectorAll("input, select, textarea, button, a, summary")]
    .filter((el) => !([...(el.labels || [])].some((l) => l.textContent.trim()) || el.getAttribute("aria-label")
                      || (["BUTTON", "A", "SUMMARY"].includes(el.tagName) && el.textContent.trim())))
    .map((el) => el.outerHTML.slice(0, 80))"""

# The layout at the current width: how far the page scrolls sideways, the visible controls that stick out of
# the viewport, and the pairs of visible controls (or labels) that overlap (neither holding the other).
LAYOUT = """() => {
    const name = (e) => e.id || e.className || e.outerHTML.slice(0, 50);
    const boxes = [...document.querySelectorAll("input, select, textarea, button, summary, a, label, progress")]
        .filter((e) => e.getClientRects().length).map((e) => [e, e.getBoundingClientRect()]);
    const overlaps = [];
    for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
        const [a, ra] = boxes[i], [b, rb] = boxes[j];
        if (a.contains(b) || b.contains(a)) continue;
        const w = Math.min(ra.right, rb.right) - Math.max(ra.left, rb.left);
        const h = Math.min(ra.bottom, rb.bottom) - Math.max(ra.top, rb.top);
        if (w > 1 && h > 1) overlaps.push([name(a), name(b)]);
    }
    return {overflow: document.scrollingElement.scrollWidth - window.innerWidth, overlaps,
            outside: boxes.filter(([e, r]) => r.left < -0.5 || r.right > window.innerWidth + 0.5).map(([e]) => name(e))};
}"""

# What the run cards showed, in order: each status text set, each old value of a progress bar (the value
# before each step's update), each latent preview's src, and how many preview elements those were.
OBSERVE = """() => {
    window.seen = {status: [], progress: [], preview: []};
    window.previewNodes = new Set();
    new MutationObserver((records) => { for (const r of records) {
        if (r.type === "attributes" && r.target.tagName === "PROGRESS") window.seen.progress.push(r.oldValue);
        else if (r.type === "attributes" && r.target.classList.contains("run-preview") && r.attributeName === "src") {
            window.seen.preview.push(r.target.getAttribute("src") || "");
            window.previewNodes.add(r.target);
        } else if (r.type === "childList" && r.target.classList.contains("run-status"))
            for (const n of r.addedNodes) window.seen.status.push(n.textContent);
    } }).observe(document.getElementById("runs"), {subtree: true, childList: true, attributes: true,
                                                     attributeOldValue: true, attributeFilter: ["value", "src"]});
}"""

FORM = """() => Object.fromEntries(["prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale",
    "best_of", "scheduler", "width", "height", "adapter", "lora_scale", "strength"].map((id) => [id, document.getElementById(id).value])
    .concat([["random", document.getElementById("seed-random").checked], ["seed_disabled", document.getElementById("seed").disabled],
             ["lora_scale_shown", document.getElementById("lora_scale-value").textContent],
             ["init_image", document.getElementById("init-preview").hidden ? null : document.getElementById("init-thumb").getAttribute("src")]]))"""


@pytest.fixture(scope="module")
def server(standard_server):
    return standard_server


@pytest.fixture(scope="module")
def browser():
    chromium = system_tool("chromium", "chromium")
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
    urls = []  # every request of every tab of this context
    context.on("request", lambda r: urls.append(r.url))
    response = page.goto(server.url + "/ui")
    assert response.status == 200 and response.headers["content-type"].startswith("text/html")
    page.wait_for_selector("body[data-ready=true]")
    yield page
    context.close()
    # the page works offline: nothing but its own server (and its own data: and blob: URLs) is asked for
    origin = urlsplit(server.url)
    foreign = [u for u in urls if not (u.startswith(("data:", f"blob:{server.url}/"))
                                        or (urlsplit(u)[:2] == origin[:2] and urlsplit(u).path in PAGE_PATHS))]
    assert urls and not foreign, foreign


def stream_schema(server) -> dict:
    doc = httpx.get(server.url + "/docs.json", timeout=30).json()
    return doc["paths"]["/generate/stream"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]


def engine(server) -> dict:
    return httpx.get(server.url + "/info", timeout=10).json()["engine"]


def set_token(page, token=TOKEN):
    page.click("#auth summary")
    page.fill("#token", token)


def check_layout(page, widths=WIDTHS):
    for w in widths:
        page.set_viewport_size({"width": w, "height": 900})
        layout = page.evaluate(LAYOUT)
        assert layout["overflow"] <= 0 and layout["overlaps"] == layout["outside"] == [], (w, layout)
    page.set_viewport_size({"width": 1280, "height": 900})


def png_text(png: bytes) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of PNG bytes, read chunk by chunk from the bytes (each CRC checked)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    text, pos, kind = {}, 8, b""
    while kind != b"IEND":
        n, kind = struct.unpack(">I4s", png[pos:pos + 8])
        data = png[pos + 8:pos + 8 + n]
        assert zlib.crc32(kind + data) == struct.unpack(">I", png[pos + 8 + n:pos + 12 + n])[0], kind
        key, _, rest = data.partition(b"\0")
        if kind == b"tEXt":
            text[key.decode("latin-1")] = rest.decode("latin-1")
        elif kind == b"zTXt":
            text[key.decode("latin-1")] = zlib.decompress(rest[1:]).decode("latin-1")
        elif kind == b"iTXt":
            _, _, value = rest[2:].split(b"\0", 2)
            text[key.decode()] = (zlib.decompress(value) if rest[0] else value).decode()
        pos += 12 + n
    assert pos == len(png)
    return text


def download(page) -> tuple[str, bytes]:
    with page.expect_download() as dl:
        page.click("#gallery li .download")
    return dl.value.suggested_filename, Path(dl.value.path()).read_bytes()


def direct(server, body) -> httpx.Response:
    r = httpx.post(server.url + "/generate", json={k: v for k, v in body.items() if k != "preview"},
                   headers={"authorization": f"Bearer {TOKEN}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r


def test_page_loads_open_with_the_servers_bounds_labelled_and_keyboard_reachable(server, page):
    assert page.errors == []
    for path, media, name in [("/ui", "text/html", "index.html"), ("/ui/app.js", "text/javascript", "app.js"),
                              ("/ui/style.css", "text/css", "style.css")]:
        r = httpx.get(server.url + path, timeout=10)  # no token: open like /docs.json
        assert r.status_code == 200 and r.headers["content-type"].startswith(media), path
        assert r.content == (FILES / name).read_bytes()
        # offline: no other origin named (nor fonts, imports); no admin, training or evaluation route
        assert not re.search(r"(https?|wss?):|@import|url\(|//[\w-]+\.[\w.-]+/", r.text), name
        assert not re.search(r"/(admin|train|eval)\b", r.text), name
    assert sorted(p.name for p in FILES.iterdir()) == ["app.js", "index.html", "style.css"]  # one script
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
    for name in ("num_inference_steps", "guidance_scale", "best_of"):
        p = props[name]
        assert page.eval_on_selector(f"#{name}", "e => [Number(e.min), Number(e.max)]") == [p["minimum"], p["maximum"]], name
        assert page.text_content(f"#{name}-hint").startswith(f"{p['minimum']:g}–{p['maximum']:g}"), name
    assert page.eval_on_selector_all("#scheduler option", "os => os.map(o => o.value)") == props["scheduler"]["enum"]
    info = httpx.get(server.url + "/info", timeout=10).json()
    assert page.eval_on_selector_all("#adapter option", "os => os.map(o => o.value)") == \
        [""] + [a["name"] for a in info["adapters"]]
    assert float(page.input_value("#lora_scale")) == info["default_lora_scale"]
    assert page.input_value("#width") == page.input_value("#height") == str(info["default_size"])
    assert info["preset"] in page.text_content("#server") and "running 0, waiting 0" in page.text_content("#server")
    assert page.input_value("#best_of") == "1"
    assert page.is_disabled("#strength") and page.is_hidden("#init-clear")  # until an init image is chosen
    assert not page.is_checked("#seed-random") and page.is_enabled("#seed")
    page.check("#seed-random")  # "random": the seed field is off (and sent as absent)
    assert page.is_disabled("#seed")
    page.uncheck("#seed-random")
    buf = io.BytesIO()
    Image.new("RGB", (40, 32), "teal").save(buf, format="PNG")
    page.set_input_files("#init_image", files=[{"name": "init.png", "mimeType": "image/png", "buffer": buf.getvalue()}])
    page.wait_for_selector("#init-preview:not([hidden])")
    # the keyboard: Enter on the token's summary opens it; then Tab reaches every visible, enabled control
    page.focus("body")
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.tagName") == "SUMMARY":
            break
    page.keyboard.press("Enter")
    assert page.evaluate("document.getElementById('auth').open") and page.is_visible("#token")
    ids = page.evaluate("""() => (window.controls = [...document.querySelectorAll("input, select, textarea, button, summary, a[href]")]
        .filter((e) => !e.disabled && e.getClientRects().length)).map((e) => e.id || e.tagName)""")
    assert set(CONTROLS) <= set(ids), set(CONTROLS) - set(ids)
    page.focus("body")
    reached = set()
    for _ in range(len(ids) + 3):
        page.keyboard.press("Tab")
        reached.add(page.evaluate("window.controls.indexOf(document.activeElement)"))
    assert set(range(len(ids))) <= reached, [ids[i] for i in set(range(len(ids))) - reached]
    assert page.evaluate(UNLABELLED) == []
    check_layout(page)
    assert page.errors == []


def test_a_generation_streams_progress_and_downloads_the_servers_png(server, page):
    info = httpx.get(server.url + "/info", timeout=10).json()
    props = stream_schema(server)
    set_token(page)
    # every field away from its default, so that the reuse below has each to put back
    scheduler = next(s for s in props["scheduler"]["enum"] if s != props["scheduler"]["default"])
    adapter = info["adapters"][-1]["name"]  # named, where the form's default is "" (the server's)
    page.fill("#prompt", "a red fox")
    page.fill("#negative_prompt", "blurry")
    page.fill("#seed", "7")
    page.fill("#num_inference_steps", "4")
    page.fill("#guidance_scale", "3.5")
    page.select_option("#scheduler", scheduler)
    page.fill("#width", "72")
    page.fill("#height", "56")
    page.select_option("#adapter", adapter)
    page.fill("#lora_scale", "0.5")
    assert page.text_content("#lora_scale-value") == "0.50"
    page.check("#preview")
    page.evaluate(OBSERVE)
    with page.expect_request(lambda r: r.url.endswith("/generate/stream")) as sent:
        page.focus("#prompt")
        page.keyboard.press("Control+Enter")  # the keyboard's way to generate
    request = sent.value
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    body = request.post_data_json
    assert body == {"prompt": "a red fox", "negative_prompt": "blurry", "seed": 7, "num_inference_steps": 4,
                    "guidance_scale": 3.5, "scheduler": scheduler, "width": 72, "height": 56, "adapter": adapter,
                    "lora_scale": 0.5, "preview": True}
    page.wait_for_selector("#gallery li")
    seen = page.evaluate("window.seen")
    assert seen["status"][1].startswith("queued: ")  # after "sending…"
    steps = [s for s in seen["status"] if s.startswith("step ")]
    assert [s.split(" · ")[0] for s in steps] == [f"step {i}/4" for i in range(1, 5)], seen["status"]
    assert all(re.fullmatch(r"step \d/4 · ETA \d+(\.\d)? s", s) for s in steps) and steps[-1].endswith("ETA 0 s")
    assert [float(v) for v in seen["progress"]] == [0, 0.25, 0.5, 0.75]  # each step's update, from 0 to 1
    # a preview per step, each a PNG, in one image element updated in place
    assert len(seen["preview"]) == 4 and all(p.startswith("data:image/png;base64,") for p in seen["preview"])
    assert len(set(seen["preview"])) > 1 and page.evaluate("window.previewNodes.size") == 1
    assert page.query_selector("#runs li") is None and page.is_visible("#runs-empty")
    # the download is the server's PNG, byte for byte: /generate's answer to the same body, with its text chunk
    name, png = download(page)
    assert name.startswith("spo-7-") and name.endswith(".png")
    answer = direct(server, body)
    assert answer.headers["x-seed"] == "7" and png == answer.content
    assert png_text(png) == {"parameters": "a red fox\nNegative prompt: blurry\n"
                             f"Steps: 4, Sampler: {scheduler}, CFG scale: 3.5, Seed: 7, Size: 72x56, Lora: {adapter}, "
                             f"Lora scale: 0.5" + (f", Lora hash: {answer.headers['x-adapter-sha256'][:16]}"
                                                   if answer.headers.get("x-adapter-sha256") else "")}
    assert page.eval_on_selector("#gallery li img", "i => [i.naturalWidth, i.naturalHeight]") == [72, 56]
    shown = page.eval_on_selector_all("#gallery li .params > *", "es => es.map(e => e.textContent)")
    shown = dict(zip(shown[::2], shown[1::2]))
    assert re.fullmatch(r"\d+\.\d s", shown.pop("time")) and shown == {
        "prompt": "a red fox", "negative": "blurry", "seed": "7", "steps": "4", "guidance": "3.5",
        "scheduler": scheduler, "size": "72×56", "adapter": adapter, "LoRA scale": "0.5"}
    # a click on the result (here: Enter on it) puts every parameter back, the seed fixed
    before = page.evaluate(FORM)
    page.fill("#prompt", "something else")
    page.fill("#negative_prompt", "")
    page.check("#seed-random")
    for field, value in [("#num_inference_steps", "30"), ("#guidance_scale", "8"), ("#best_of", "2"), ("#width", "128"),
                         ("#height", "")]:
        page.fill(field, value)
    page.select_option("#scheduler", props["scheduler"]["default"])
    page.select_option("#adapter", "")
    page.fill("#lora_scale", "1.5")
    page.focus("#gallery li .reuse")
    page.keyboard.press("Enter")
    assert page.evaluate(FORM) == before
    assert before["seed"] == "7" and before["random"] is False and before["adapter"] == adapter and before["width"] == "72"
    # the token lives in this tab's sessionStorage only: a reload keeps it (and sends it), a new tab has none
    assert page.evaluate("[sessionStorage.getItem('spo-serve.token'), localStorage.length, document.cookie]") == [TOKEN, 0, ""]
    assert page.context.cookies() == []
    assert page.evaluate(UNLABELLED) == []
    check_layout(page)
    assert page.errors == []
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    with page.expect_request(lambda r: r.url.endswith("/info")) as sent:
        page.reload()
    assert sent.value.headers["authorization"] == f"Bearer {TOKEN}" and page.input_value("#token") == TOKEN
    other = page.context.new_page()
    with other.expect_request(lambda r: r.url.endswith("/info")) as sent:
        other.goto(server.url + "/ui")
    other.wait_for_selector("body[data-ready=true]")
    assert "authorization" not in sent.value.headers and other.input_value("#token") == ""


def test_img2img_with_a_random_seed_sends_the_file_and_strength(server, page):
    set_token(page)
    buf = io.BytesIO()
    Image.radial_gradient("L").resize((72, 48)).convert("RGB").save(buf, format="PNG")
    page.set_input_files("#init_image", files=[{"name": "init.png", "mimeType": "image/png", "buffer": buf.getvalue()}])
    page.wait_for_selector("#init-preview:not([hidden])")
    assert page.is_enabled("#strength")
    page.fill("#strength", "0.5")
    page.fill("#num_inference_steps", "4")
    page.check("#seed-random")
    page.fill("#width", "")
    page.fill("#height", "")  # the init image's size
    with page.expect_request(lambda r: r.url.endswith("/generate/stream")) as sent:
        page.focus("#generate")
        page.keyboard.press("Enter")  # the button, from the keyboard
    body = sent.value.post_data_json
    assert body["strength"] == 0.5 and body["init_image"].startswith("data:image/png;base64,")
    assert "width" not in body and "height" not in body and "seed" not in body
    page.wait_for_selector("#gallery li")
    page.evaluate("refreshInfo()")  # the page's /info after a result leaves the emptied sizes empty
    assert page.input_value("#width") == page.input_value("#height") == ""
    seed = int(page.get_attribute("#gallery li", "data-seed"))
    assert page.eval_on_selector("#gallery li img", "i => [i.naturalWidth, i.naturalHeight]") == [72, 48]
    _, png = download(page)
    # the server drew the seed: the same body with it is the same image
    assert png == direct(server, {**body, "seed": seed}).content
    assert f"Seed: {seed}," in png_text(png)["parameters"] and "Denoising strength: 0.5" in png_text(png)["parameters"]
    page.click("#init-clear")
    assert page.is_hidden("#init-preview") and page.is_disabled("#strength")
    other = io.BytesIO()
    Image.new("RGB", (32, 32), "olive").save(other, format="PNG")
    page.set_input_files("#init_image", files=[{"name": "other.png", "mimeType": "image/png", "buffer": other.getvalue()}])
    page.wait_for_selector("#init-preview:not([hidden])")
    page.fill("#strength", "0.9")
    page.fill("#width", "64")
    page.click("#gallery li .reuse")  # the init image and strength back, the drawn seed fixed
    form = page.evaluate(FORM)
    assert form["init_image"] == body["init_image"] and form["strength"] == "0.5" and page.is_enabled("#strength")
    assert (form["seed"], form["random"], form["seed_disabled"], form["width"], form["height"]) == (str(seed), False, False, "", "")
    assert page.errors == []


def test_cancel_aborts_the_stream_and_frees_the_slot(server, page):
    set_token(page)
    page.fill("#num_inference_steps", "100")
    for n, cancel in [(1, lambda: page.get_by_role("button", name=re.compile("^Cancel #1 ")).click()),
                      (2, lambda: page.keyboard.press("Escape"))]:  # the button; Esc, the newest request's
        page.click("#generate")
        page.wait_for_function("() => /^step \\d+\\/100/.test(document.querySelector('#runs li:first-child .run-status').textContent)")
        assert engine(server)["running"] == 1
        cancel()
        page.wait_for_function("() => document.querySelector('#runs li:first-child .run-status').textContent === 'cancelled'")
        t0 = time.time()
        while time.time() - t0 < 30:
            stats = engine(server)
            if stats["running"] == 0 and stats["waiting"] == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"#{n}: the slot was not freed: {stats}")
        assert page.text_content("#runs li:first-child .run-title").startswith(f"#{n} ")
    assert page.query_selector("#gallery li") is None
    for n in (1, 2):
        page.get_by_role("button", name=re.compile(f"^Dismiss #{n} ")).click()
    assert page.query_selector("#runs li") is None
    assert page.errors == []


def test_each_request_has_its_own_progress_bar(server, page):
    set_token(page)
    page.fill("#num_inference_steps", "4")
    page.evaluate("""() => { window.bars = new Map();
        new MutationObserver((rs) => { for (const r of rs) if (r.target.tagName === "PROGRESS") {
            if (!window.bars.has(r.target)) window.bars.set(r.target, []);
            window.bars.get(r.target).push(r.oldValue);
        } }).observe(document.getElementById("runs"), {subtree: true, attributes: true, attributeOldValue: true,
                                                        attributeFilter: ["value"]}); }""")
    page.focus("#prompt")
    page.fill("#seed", "11")
    page.keyboard.press("Control+Enter")
    page.fill("#seed", "12")
    page.keyboard.press("Control+Enter")  # while the first runs
    page.wait_for_function("() => document.querySelectorAll('#gallery li').length === 2")
    bars = page.evaluate("() => [...window.bars.values()].map((v) => v.map(Number))")
    assert bars == [[0, 0.25, 0.5, 0.75]] * 2
    assert sorted(page.eval_on_selector_all("#gallery li", "ls => ls.map(l => l.dataset.seed)")) == ["11", "12"]
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
    check_layout(page, (360, 1920))  # the failed cards and the messages fit too
    # the only console errors: the browser's line for each refused request (401, 400, 400)
    assert len(page.errors) == 3 and all("Failed to load resource" in e for e in page.errors), page.errors
    assert engine(server)["running"] == 0


def test_best_of_is_sent_and_its_score_shown(server, page):
    set_token(page)
    page.fill("#seed", "3")
    page.fill("#num_inference_steps", "2")
    page.fill("#best_of", "2")
    with page.expect_request(lambda r: r.url.endswith("/generate/stream")) as sent:
        page.press("#best_of", "Enter")  # Enter in a field submits the form
    body = sent.value.post_data_json
    assert body["best_of"] == 2 and body["seed"] == 3
    page.wait_for_selector("#gallery li")
    params = page.text_content("#gallery li .params")
    shown = re.search(r"best of\s*2 \(score (-?\d+\.\d{3})\)", params)
    assert shown, params
    # the server's answer to the same body names the same candidate count and a score
    answer = direct(server, body)
    assert answer.headers["x-best-of"] == "2", answer.text
    # the same candidates' score (within the page's 3 decimals; another batch may move the last bits)
    assert abs(float(answer.headers["x-preference-score"]) - float(shown.group(1))) <= 2e-3, (answer.headers, params)
    page.fill("#best_of", "1")
    page.click("#gallery li .reuse")
    assert page.input_value("#best_of") == "2"
    assert page.errors == []
