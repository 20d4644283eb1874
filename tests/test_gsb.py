"""GSB rating page (issues 5, 10, 13): the Score of the paper's tables, side un-swapping, hostile
ids, requests and store contents, concurrent submits, blindness, the operator-only tallies,
binding, and a real headless Chromium rating pairs by clicking on one 1366x768 screen."""

from __future__ import annotations

import logging
import math
import multiprocessing
import random
import re
import shutil
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from infra.stage import stage_dir
from infra.store import Store
from infra.video import run_ffmpeg
from tasks.gsb.ratings import (
    Comparison, GSBError, RatingLog, candidate_label, comparisons, counted, format_score, gsb_score,
    new_rating, rating_tasks, ratings_prefix,
)
from tasks.gsb.web import (
    COOKIE, LOOPBACK_HOSTS, MAX_BODY, SYNC_JS, SYNC_JS_HASH, GSBSite, byte_range, create_app, is_loopback,
)

RUN = "gsb-test"
SEED = 42
HOSTILE_PROMPT = """<script>alert("x")</script> & 'quoted' <b>not bold</b> a fox"""
PROMPTS = {"p0": HOSTILE_PROMPT, "p1": "a red fox runs through deep snow"}
MODELS = ("base", "reg-dpo", "dpo")

# -- fixtures: real clips (ffmpeg lavfi) behind a committed evaluate manifest ------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """One small H.264 clip per (model, prompt) and one reference PNG per prompt."""
    out = tmp_path_factory.mktemp("gsb-clips")
    paths = {}
    for i, model in enumerate(MODELS):
        for pid in PROMPTS:
            paths[f"{model}-{pid}"] = _clip(out / f"{model}-{pid}.mp4", (128, 96), hue=60 * i)
    for pid in PROMPTS:
        paths[f"ref-{pid}"] = _ref_frame(out / f"ref-{pid}.png", (64, 48))
    return paths


def _clip(dst: Path, size: tuple[int, int], hue: int, seconds: int = 1) -> Path:
    run_ffmpeg(["ffmpeg", "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
                f"testsrc2=size={size[0]}x{size[1]}:rate=8:duration={seconds}", "-vf", f"hue=h={hue}",
                "-c:v", "libx264", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(dst)])
    return dst


def _ref_frame(dst: Path, size: tuple[int, int]) -> Path:
    run_ffmpeg(["ffmpeg", "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
                f"color=c=navy:s={size[0]}x{size[1]}", "-frames:v", "1", str(dst)])
    return dst


def make_evaluate(store: Store, clips: dict[str, Path], extra: list[dict] = ()) -> list[dict]:
    """The evaluate stage's contract: one row per generated video, committed and in run.json."""
    refs = {pid: store.put_file(clips[f"ref-{pid}"], f"items/evaluate/ref-{pid}.png") for pid in PROMPTS}
    rows = [{"id": f"{m}-{pid}", "status": "ok", "reason": "", "prompt_id": pid, "prompt": prompt,
             "ref": refs[pid], "model": m, "seed": SEED,
             "video": store.put_file(clips[f"{m}-{pid}"], f"items/evaluate/{m}-{pid}/video.mp4")}
            for m in MODELS for pid, prompt in PROMPTS.items()]
    rows.append({"id": "dpo-p2", "status": "failed", "reason": "RuntimeError: out of memory",
                 "prompt_id": "p2", "prompt": "never rendered", "ref": None, "model": "dpo",
                 "seed": SEED, "video": None})
    rows += list(extra)
    commit_evaluate(store, rows)
    return rows


def commit_evaluate(store: Store, rows: list[dict]) -> None:
    key = "evalkey0123456789"
    record = store.commit_manifest(stage_dir("evaluate", key), rows, {"stage": "evaluate"})
    store.update_run(RUN, "evaluate", {"key": key, "manifest": record["manifest"], "counts": {}})


@pytest.fixture
def local_store(tmp_path: Path, clips) -> Store:
    store = Store(f"file://{tmp_path / 'store'}")
    make_evaluate(store, clips)
    return store


@pytest.fixture
def site(local_store: Store) -> GSBSite:
    return GSBSite.load(local_store, RUN, rng=random.Random(0))


def _rater_client(site: GSBSite, rater: str = "alice", **app_kw) -> TestClient:
    client = TestClient(create_app(site, **app_kw))
    assert client.post("/rater", data={"rater": rater}).status_code == 200  # redirected to /rate
    return client


def _hidden(html: str) -> dict[str, str]:
    return dict(re.findall(r"<input type=hidden name=(\w+) value='([^']*)'>", html))


def _media_url(site: GSBSite, row_id: str, kind: str = "video") -> str:
    """Where a rating page would fetch the row's video (or reference frame) from."""
    task = next(t for t in site.tasks if row_id in (t.candidate["id"], t.baseline["id"]))
    row = task.candidate if task.candidate["id"] == row_id else task.baseline
    return f"/{kind}/{site.media_id(task, row)}"


def _stored(store: Store) -> list[dict]:
    return [store.read_json(k) for k in store.list(ratings_prefix(RUN))]


# -- the Score, as printed in the paper's GSB tables --------------------------------------------

# (Good, Same, Bad, Score) from Tables 1, 3, 4 and 8 of paper 001, VQ and PF columns.
PAPER_GSB = [
    (278, 75, 141, "1.63"), (168, 246, 80, "1.27"), (217, 183, 95, "1.44"), (130, 324, 41, "1.24"),
    (240, 110, 142, "1.39"), (137, 261, 94, "1.12"),  # Table 1
    (308, 76, 111, "2.05"), (277, 101, 117, "1.73"), (258, 95, 142, "1.49"), (186, 222, 87, "1.32"),
    (262, 104, 129, "1.57"), (193, 189, 113, "1.26"),  # Table 3
    (242, 157, 101, "1.55"), (172, 285, 43, "1.39"), (203, 173, 124, "1.27"), (102, 342, 56, "1.12"),
    (169, 232, 99, "1.21"), (150, 281, 69, "1.23"),  # Table 4
    (297, 91, 112, "1.91"), (145, 273, 82, "1.18"), (225, 155, 120, "1.38"), (114, 321, 65, "1.13"),
    (172, 205, 123, "1.15"), (181, 255, 64, "1.37"),  # Table 8
]


@pytest.mark.parametrize("good,same,bad,printed", PAPER_GSB)
def test_score_reproduces_paper_tables(good, same, bad, printed):
    assert format_score(gsb_score(good, same, bad)) == printed


def test_score_without_same_or_bad():
    assert gsb_score(3, 0, 0) == math.inf and format_score(gsb_score(3, 0, 0)) == "∞"
    assert gsb_score(0, 0, 0) is None and format_score(None) == "–"
    assert gsb_score(0, 4, 0) == 1.0  # all Same: A and B tie
    assert gsb_score(0, 0, 2) == 0.0


# -- sides ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shown,candidate_left,label", [
    ("good", True, "good"), ("same", True, "same"), ("bad", True, "bad"),
    ("good", False, "bad"), ("same", False, "same"), ("bad", False, "good"),
])
def test_unswap_left_answer_to_candidate(shown, candidate_left, label):
    assert candidate_label(shown, candidate_left) == label


def test_unswap_rejects_unknown_answer():
    with pytest.raises(ValueError, match="not one of good, same, bad"):
        candidate_label("better", True)


# -- comparisons and tasks from the evaluate manifest ------------------------------------------


def test_default_comparisons_and_tasks(site: GSBSite):
    assert [c.name for c in site.comps] == ["dpo vs base", "reg-dpo vs base"]
    assert {(t.comparison.candidate, t.prompt_id) for t in site.tasks} == {
        (m, p) for m in ("dpo", "reg-dpo") for p in PROMPTS}  # the failed p2 row is not a task
    for t in site.tasks:
        assert t.candidate["prompt_id"] == t.baseline["prompt_id"] and t.baseline["model"] == "base"
    assert len({t.id for t in site.tasks}) == 4


def test_pair_option_and_its_errors(local_store: Store):
    rows = GSBSite.load(local_store, RUN, ["reg-dpo,dpo"]).tasks
    assert {(t.comparison.name, t.prompt_id) for t in rows} == {("reg-dpo vs dpo", p) for p in PROMPTS}
    with pytest.raises(GSBError, match=r"no ok videos for \['sft'\].*models there"):
        GSBSite.load(local_store, RUN, ["sft,base"])
    with pytest.raises(GSBError, match="two different model labels CANDIDATE,BASELINE"):
        GSBSite.load(local_store, RUN, ["reg-dpo"])
    with pytest.raises(GSBError, match="no committed 'evaluate' stage"):
        GSBSite.load(local_store, "other-run")


def test_no_baseline_needs_pair():
    rows = [{"id": "a", "model": "dpo", "prompt_id": "p", "seed": 1}]
    with pytest.raises(GSBError, match="no 'base' videos.*--pair"):
        comparisons(rows)


def test_tasks_pair_same_prompt_and_seed():
    rows = [{"id": f"{m}{s}", "model": m, "prompt_id": "p", "seed": s, "prompt": "x"}
            for m in ("base", "a") for s in (1, 2)] + [{"id": "a3", "model": "a", "prompt_id": "p", "seed": 3}]
    tasks = rating_tasks(rows, [Comparison("a", "base")])
    assert sorted((t.candidate["id"], t.baseline["id"]) for t in tasks) == [("a1", "base1"), ("a2", "base2")]


def test_first_rating_per_rater_counts_and_stale_ones_do_not(site: GSBSite):
    t = site.tasks[0]
    base = {"candidate": "x", "labels": {"video_quality": "good", "prompt_following": "good"}}
    ratings = [
        {**base, "id": "2", "task": t.id, "rater": "alice", "rated_at": "2026-01-02T00:00:00Z"},
        {**base, "id": "1", "task": t.id, "rater": "alice", "rated_at": "2026-01-01T00:00:00Z"},
        {**base, "id": "3", "task": t.id, "rater": "bob", "rated_at": "2026-01-03T00:00:00Z"},
        {**base, "id": "4", "task": "gone-video", "rater": "bob", "rated_at": "2026-01-03T00:00:00Z"},
    ]
    assert sorted(r["id"] for r in counted(ratings, site.tasks)) == ["1", "3"]


# -- the web app: what raters can and cannot do -------------------------------------------------


def test_rating_flow_stores_unswapped_labels(site: GSBSite, local_store: Store):
    client = _rater_client(site)
    seen_left = set()
    for _ in site.tasks:
        page = client.get("/rate").text
        form = _hidden(page)
        task = next(t for t in site.tasks if t.id == form["task"])
        candidate_left = form["left"] == site.media_id(task, task.candidate)
        seen_left.add(candidate_left)
        assert f"src='/video/{form['left']}'" in page
        r = client.post("/rate", data={**form, "video_quality": "good", "prompt_following": "bad"},
                        follow_redirects=False)
        assert r.status_code == 303
    assert seen_left == {True, False}  # Random(0) put the candidate on both sides
    assert "you rated all 4 pairs" in client.get("/rate").text
    stored = _stored(local_store)
    assert len(stored) == 4
    for r in stored:
        left_is_candidate = r["left"]["model"] == r["candidate"]
        assert r["shown"] == {"video_quality": "good", "prompt_following": "bad"}
        assert r["labels"] == ({"video_quality": "good", "prompt_following": "bad"} if left_is_candidate
                               else {"video_quality": "bad", "prompt_following": "good"})
        assert r["rater"] == "alice" and r["baseline"] == "base" and r["right"]["model"] != r["left"]["model"]


def test_prompt_is_escaped_and_page_allows_only_the_sync_script(site: GSBSite):
    client = _rater_client(site)
    for _ in site.tasks:  # rate until the hostile prompt's pair comes up
        page = client.get("/rate")
        if "alert" in page.text:
            break
        client.post("/rate", data={**_hidden(page.text), "video_quality": "same", "prompt_following": "same"})
    assert "<b>not bold</b>" not in page.text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;quoted&#x27;" in page.text
    assert re.findall(r"<script>(.*?)</script>", page.text, re.S) == [SYNC_JS]  # the only script
    csp = dict(d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";"))
    assert csp["script-src"] == f"'{SYNC_JS_HASH}'" and csp["default-src"] == "'none'"
    assert page.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", [
    "/video/unknown", "/video/..%2F..%2Fetc%2Fpasswd", "/video/%2Fetc%2Fpasswd", "/video/.",
    "/video/evil-p0", "/video/evil-p1", "/ref/evil-p0", "/ref/nope", "/video/dpo-p2", "/video/base-p0",
    "/video/base-p0/../../manifest.parquet", "/static/../runs/gsb-test/run.json",
    "media:video:evil-p0", "media:video:evil-p1", "media:ref:evil-p0",  # a rating page's URL for them
])
def test_hostile_media_requests_are_404(path, tmp_path: Path, clips):
    store = Store(f"file://{tmp_path / 'store'}")
    (tmp_path / "outside.mp4").write_bytes(clips["base-p0"].read_bytes())
    evil = [  # a manifest pointing outside the store must not become a file read either
        {"id": "evil-p0", "status": "ok", "reason": "", "prompt_id": "p0", "prompt": "x", "model": "evil",
         "seed": SEED, "video": "file:///etc/passwd", "ref": "file:///etc/hostname"},
        {"id": "evil-p1", "status": "ok", "reason": "", "prompt_id": "p1", "prompt": "x", "model": "evil",
         "seed": SEED, "video": f"{store.url}/../outside.mp4", "ref": None},
    ]
    make_evaluate(store, clips, evil)
    site = GSBSite.load(store, RUN, ["evil,base", "dpo,base"])
    client = TestClient(create_app(site))
    if path.startswith("media:"):
        _, kind, row_id = path.split(":")
        path = _media_url(site, row_id, kind)
    assert client.get(path).status_code == 404
    assert client.get(_media_url(site, "base-p0")).status_code == 200


def test_video_range_requests(site: GSBSite, clips):
    client = TestClient(create_app(site))
    data = clips["reg-dpo-p1"].read_bytes()
    url = _media_url(site, "reg-dpo-p1")
    whole = client.get(url)
    assert whole.status_code == 200 and whole.content == data and whole.headers["accept-ranges"] == "bytes"
    part = client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    assert client.get(url, headers={"Range": "bytes=-10"}).content == data[-10:]
    miss = client.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert miss.status_code == 416 and miss.headers["content-range"] == f"bytes */{len(data)}"
    assert client.get(_media_url(site, "reg-dpo-p1", "ref")).headers["content-type"] == "image/png"


@pytest.mark.parametrize("header,expect", [
    (None, None), ("bytes=0-", (0, 99)), ("bytes=10-20", (10, 20)), ("bytes=90-500", (90, 99)),
    ("bytes=-5", (95, 99)), ("bytes=-500", (0, 99)), ("items=0-5", None), ("bytes=1-2,5-6", None),
    ("bytes=x-5", None), ("bytes=5", None),
])
def test_byte_range(header, expect):
    assert byte_range(header, 100) == expect


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=20-10", "bytes=-0"])
def test_byte_range_unsatisfiable(header):
    with pytest.raises(ValueError):
        byte_range(header, 100)


def test_raters_cannot_forge_overwrite_or_delete(site: GSBSite, local_store: Store):
    client = _rater_client(site)
    form = _hidden(client.get("/rate").text)
    answers = {"video_quality": "same", "prompt_following": "same"}
    task = next(t for t in site.tasks if t.id == form["task"])
    other_side = next(site.media_id(task, r) for r in (task.candidate, task.baseline)
                      if site.media_id(task, r) != form["left"])
    assert client.post("/rate", data={**form, **answers, "left": other_side}).status_code == 409  # forged sides
    assert client.post("/rate", data={**form, **answers, "token": "0" * 64}).status_code == 409
    assert client.post("/rate", data={**form, **answers, "task": "../../etc"}).status_code == 404
    assert client.post("/rate", data={**form, "video_quality": "same"}).status_code == 400  # incomplete
    assert client.post("/rate", data={**form, **answers, "pad": "x" * MAX_BODY}).status_code == 413
    assert client.post("/rate", json={**form, **answers}).status_code == 400  # not a form
    assert local_store.list(ratings_prefix(RUN)) == []
    assert client.post("/rate", data={**form, **answers}, follow_redirects=False).status_code == 303
    assert client.post("/rate", data={**form, **answers}).status_code == 409  # first rating stands
    bob = _rater_client(site, "bob")
    bob_form = {**form, "token": site.sign("bob", form["task"], form["left"])}
    assert bob.post("/rate", data={**bob_form, **answers}, follow_redirects=False).status_code == 303
    assert len(local_store.list(ratings_prefix(RUN))) == 2  # one object per rating, none replaced
    key = local_store.list(ratings_prefix(RUN))[0]
    for method in ("DELETE", "PUT", "PATCH"):
        assert client.request(method, "/rate").status_code == 405
        assert client.request(method, "/" + key).status_code in (404, 405)
    assert client.post("/rater", data={"rater": "../../x"}).status_code == 400
    assert TestClient(create_app(site)).get("/rate", follow_redirects=False).status_code == 303  # no id yet


def test_rating_log_reads_ratings_other_servers_wrote(site: GSBSite, local_store: Store):
    carol = _rater_client(site, "carol")
    carol.post("/rate", data={**_hidden(carol.get("/rate").text), "video_quality": "good",
                              "prompt_following": "good"})
    fresh = RatingLog(local_store, RUN).refresh()
    assert [r["rater"] for r in fresh] == ["carol"]


def test_binds_localhost_by_default(monkeypatch, local_store: Store):
    import tasks.gsb.web as web
    from flows.cli import app

    served = {}
    monkeypatch.setattr(web, "serve", lambda app_, host, port: served.update(app=app_, host=host, port=port))
    result = CliRunner().invoke(app, ["gsb", "serve", "--run", RUN, "--store", local_store.url])
    assert result.exit_code == 0, result.output
    assert served["host"] == "127.0.0.1" and served["port"] == 8765
    client = TestClient(served["app"], base_url="http://evil.example:8765")
    assert client.get("/").status_code == 400  # Host header of a DNS-rebinding page is refused
    assert TestClient(served["app"], base_url="http://127.0.0.1:8765").get("/").status_code == 200
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")
    bad = CliRunner().invoke(app, ["gsb", "serve", "--run", "missing", "--store", local_store.url])
    assert bad.exit_code == 2 and "no committed 'evaluate' stage" in bad.output
    assert LOOPBACK_HOSTS[0] == "127.0.0.1"


def test_tally_cli_prints_the_paper_table(site: GSBSite, local_store: Store):
    from flows.cli import app

    client = _rater_client(site)
    for _ in site.tasks:
        client.post("/rate", data={**_hidden(client.get("/rate").text), "video_quality": "same",
                                   "prompt_following": "same"})
    out = CliRunner().invoke(app, ["gsb", "tally", "--run", RUN, "--store", local_store.url]).output
    assert "| reg-dpo vs base | 2 | 0/2/0 | 1.00 | 0/2/0 | 1.00 |" in out, out


def test_video_from_s3_store(s3_store_url, clips):
    store = Store(s3_store_url)
    make_evaluate(store, clips)
    site = GSBSite.load(store, RUN)
    client = TestClient(create_app(site))
    data = clips["dpo-p0"].read_bytes()
    part = client.get(_media_url(site, "dpo-p0"), headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == data[:100]
    assert client.get(_media_url(site, "dpo-p0")).content == data


# -- a real browser ----------------------------------------------------------------------------

# What the rater means, candidate vs baseline; the test clicks the left-vs-right equivalent.
INTENT = {
    ("reg-dpo", "p0"): {"video_quality": "good", "prompt_following": "same"},
    ("reg-dpo", "p1"): {"video_quality": "same", "prompt_following": "bad"},
    ("dpo", "p0"): {"video_quality": "bad", "prompt_following": "good"},
    ("dpo", "p1"): {"video_quality": "good", "prompt_following": "good"},
}
BOB = {"video_quality": "bad", "prompt_following": "same"}
MIRROR = {"good": "bad", "same": "same", "bad": "good"}  # "left is better" when the candidate is right


@contextmanager
def _server(app):
    """uvicorn on a socket that is already listening: requests queue until it serves them."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture
def chromium():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the browser test needs selenium: pip install -e '.[dev]'", pytrace=False)
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.fail("the browser test needs Debian's chromium and chromedriver: "
                    "apt-get install chromium chromium-driver (scripts/bootstrap.sh does it as root)",
                    pytrace=False)
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1366,768", "--force-device-scale-factor=1",
                "--autoplay-policy=no-user-gesture-required"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations land there
    browser = webdriver.Chrome(service=Service(driver), options=opts)  # system driver: no download
    browser.set_page_load_timeout(60)
    try:
        yield browser
    finally:
        browser.quit()


def _rate_in_browser(browser, url: str, rows: dict, intent) -> dict:
    """Rate the pair on screen as `intent(candidate, prompt_id)` means it; returns what was shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{url}/rate")
    left_id = browser.find_element(By.ID, "video-left").get_attribute("src").rsplit("/", 1)[1]
    right_id = browser.find_element(By.ID, "video-right").get_attribute("src").rsplit("/", 1)[1]
    left, right = rows[left_id], rows[right_id]  # the server's map: the page does not say
    candidate = left if left["model"] != "base" else right
    candidate_left = candidate is left
    WebDriverWait(browser, 30).until(  # the browser fetched and parsed the mp4 (HAVE_METADATA)
        lambda b: b.execute_script("return document.getElementById('video-right').readyState") >= 1)
    wanted = intent(candidate["model"], candidate["prompt_id"])
    for aspect, label in wanted.items():
        browser.find_element(By.ID, f"{aspect}-{label if candidate_left else MIRROR[label]}").click()
    shown = browser.find_element(By.ID, "prompt").get_attribute("textContent")
    form = browser.find_element(By.ID, "rating")
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 30).until(staleness_of(form))  # the POST and its redirect finished
    return {"left": left_id, "right": right_id, "candidate_left": candidate_left, "prompt": shown,
            "prompt_id": candidate["prompt_id"], "model": candidate["model"], "labels": wanted}


def _start_as(browser, url: str, rater: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.ui import WebDriverWait

    browser.delete_all_cookies()
    browser.get(url + "/")
    box = browser.find_element(By.ID, "rater")
    box.clear()
    box.send_keys(rater)
    browser.find_element(By.ID, "start").click()
    WebDriverWait(browser, 30).until(staleness_of(box))  # the cookie is set, /rate loaded


@pytest.mark.slow
def test_browser_rates_pairs_and_shows_scores(chromium, site: GSBSite, local_store: Store):
    from selenium.webdriver.common.by import By

    rows = site.media
    with _server(create_app(site, LOOPBACK_HOSTS)) as url:
        _start_as(chromium, url, "alice")
        alice = [_rate_in_browser(chromium, url, rows, lambda m, p: INTENT[(m, p)]) for _ in site.tasks]
        assert "you rated all 4 pairs" in chromium.find_element(By.TAG_NAME, "body").text
        _start_as(chromium, url, "bob")
        bob = _rate_in_browser(chromium, url, rows, lambda m, p: BOB)
        chromium.get(f"{url}/tallies?token={site.operator_token}")
        cells = {tr.get_attribute("data-comparison"): {td.get_attribute("class"): td.text
                                                      for td in tr.find_elements(By.TAG_NAME, "td")}
                 for tr in chromium.find_elements(By.CSS_SELECTOR, "#tallies tr[data-comparison]")}

    assert {a["candidate_left"] for a in alice} == {True, False}  # both sides were exercised
    assert {(a["model"], a["prompt_id"]) for a in alice} == set(INTENT)
    assert next(a for a in alice if a["prompt_id"] == "p0")["prompt"] == HOSTILE_PROMPT

    stored = {(r["rater"], r["task"]): r for r in
              (local_store.read_json(k) for k in local_store.list(ratings_prefix(RUN)))}
    assert len(stored) == 5
    for rater, clicked in [("alice", a) for a in alice] + [("bob", bob)]:
        task = next(t for t in site.tasks if {clicked["left"], clicked["right"]}
                    == {site.media_id(t, t.candidate), site.media_id(t, t.baseline)})
        r = stored[(rater, task.id)]
        assert (r["left"]["video"], r["right"]["video"]) == (rows[clicked["left"]]["id"], rows[clicked["right"]]["id"])
        assert (r["left"]["model"] == r["candidate"]) == clicked["candidate_left"]
        assert r["labels"] == clicked["labels"]

    expected = {}
    for clicked in alice + [bob]:
        counts = expected.setdefault(f"{clicked['model']} vs base",
                                     {a: {"good": 0, "same": 0, "bad": 0} for a in BOB})
        for aspect, label in clicked["labels"].items():
            counts[aspect][label] += 1
    for comparison, counts in expected.items():
        for aspect, c in counts.items():
            assert cells[comparison][aspect] == f"{c['good']} / {c['same']} / {c['bad']}"
            assert cells[comparison][f"{aspect}-score"] == format_score(gsb_score(c["good"], c["same"], c["bad"]))
    # alice alone: reg-dpo VQ 1/1/0 -> 2.00, PF 0/1/1 -> 0.50; dpo VQ 1/0/1 -> 1.00, PF 2/0/0 -> ∞;
    # bob's one rating (VQ Bad, PF Same) lands on one of them.
    scores = {c: (cells[c]["video_quality-score"], cells[c]["prompt_following-score"]) for c in cells}
    assert scores in ({"reg-dpo vs base": ("1.00", "0.67"), "dpo vs base": ("1.00", "∞")},
                      {"reg-dpo vs base": ("2.00", "0.50"), "dpo vs base": ("0.50", "3.00")})


def test_a_re_rendered_video_is_a_new_task():
    """evaluate re-run after a new train: same row ids (prompt, label, seed), new video URIs;
    the old ratings must not count for (or block) the new pair."""
    from tasks.gsb.ratings import Comparison, rating_tasks

    def rows(tag: str) -> list[dict]:
        return [{"id": f"p0-{m}-s0", "prompt_id": "p0", "seed": 0, "model": m, "prompt": "x",
                 "status": "ok", "video": f"file:///s/items/evaluate/{tag}{m}/video.mp4"}
                for m in ("base", "regdpo")]

    comp = [Comparison("regdpo", "base")]
    (old,), (new,), (same,) = (rating_tasks(rows(t), comp) for t in ("a", "b", "a"))
    assert old.id != new.id and old.id == same.id


# -- hostile input (issue 10): one form submitted many times at once, unreadable store objects --

ANSWERS = {"video_quality": "good", "prompt_following": "same"}


def _submit_at_once(urls: list[str], form: dict[str, str], n: int = 20) -> list[int]:
    """n copies of one form as alice, released together by a barrier, spread over the servers."""
    import httpx

    barrier = threading.Barrier(n)

    def submit(i: int) -> int:
        with httpx.Client(base_url=urls[i % len(urls)], cookies={COOKIE: "alice"}, timeout=60) as client:
            barrier.wait(timeout=60)
            return client.post("/rate", data=form, follow_redirects=False).status_code

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(submit, range(n)))


def _one_form(site: GSBSite) -> dict[str, str]:
    return {**_hidden(_rater_client(site).get("/rate").text), **ANSWERS}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "s3"])
def test_twenty_simultaneous_submissions_store_one_rating(kind, request, tmp_path: Path, clips):
    url = f"file://{tmp_path / 'store'}" if kind == "file" else request.getfixturevalue("s3_store_url")
    store = Store(url)
    make_evaluate(store, clips)
    site = GSBSite.load(store, RUN)
    form = _one_form(site)
    with _server(create_app(site)) as server:
        codes = _submit_at_once([server], form)
    assert sorted(codes) == [303] + [409] * 19  # one stored, the rest told "already rated"
    stored = _stored(Store(url))  # a fresh client: no listing cache
    assert len(stored) == 1 and stored[0]["rater"] == "alice" and stored[0]["task"] == form["task"]


def _serve_in_process(store_url: str, secret: bytes, ports) -> None:
    """Another `gsb serve` of the run (spawned); its port goes to `ports` once it listens."""
    import uvicorn

    app = create_app(GSBSite.load(Store(store_url), RUN, secret=secret))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    ports.put(sock.getsockname()[1])
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


@contextmanager
def _server_processes(store_url: str, secret: bytes, n: int):
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    procs = [ctx.Process(target=_serve_in_process, args=(store_url, secret, ports), daemon=True)
             for _ in range(n)]
    for proc in procs:
        proc.start()
    try:
        yield [f"http://127.0.0.1:{ports.get(timeout=120)}" for _ in procs]
    finally:
        for proc in procs:
            proc.terminate()
            proc.join(timeout=30)


@pytest.mark.slow
def test_two_server_processes_store_one_rating(local_store: Store):
    secret = b"shared secret: both servers accept the same form."
    form = _one_form(GSBSite.load(local_store, RUN, secret=secret))
    with _server_processes(local_store.url, secret, 2) as urls:
        codes = _submit_at_once(urls, form)
    assert sorted(codes) == [303] + [409] * 19
    assert len(_stored(local_store)) == 1


def test_rating_log_on_s3_sees_other_servers_ratings(s3_store_url, clips):
    store = Store(s3_store_url)
    make_evaluate(store, clips)
    site = GSBSite.load(store, RUN)
    assert site.ratings.refresh() == []  # lists (and s3fs caches) the empty folder
    other = RatingLog(Store(s3_store_url), RUN)  # another server process's client
    assert other.create(new_rating(RUN, site.tasks[0], "bob", True, ANSWERS))
    assert not other.create(new_rating(RUN, site.tasks[0], "bob", False, ANSWERS))
    assert [r["rater"] for r in site.ratings.refresh()] == ["bob"]


def test_unreadable_rating_files_are_skipped_logged_and_counted(site: GSBSite, local_store: Store, caplog):
    from tasks.gsb.ratings import run_tally

    broken = f"{ratings_prefix(RUN)}/broken.json"
    local_store.write_bytes(broken, b'{"schema": "regdpo.gsb.rating.v1", "task": ')  # cut short
    client = _rater_client(site)
    tallies = f"/tallies?token={site.operator_token}"
    with caplog.at_level(logging.WARNING, logger="regdpo.gsb"):
        page = client.get("/rate")
        assert page.status_code == 200
        assert client.post("/rate", data={**_hidden(page.text), **ANSWERS},
                           follow_redirects=False).status_code == 303
        shown = client.get(tallies)
        client.get("/rate")
    assert shown.status_code == 200 and "1 unreadable rating file skipped" in shown.text
    assert sum(map(int, re.findall(r"<td class=ratings>(\d+)</td>", shown.text))) == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and local_store.uri(broken) in warned[0]  # named, and once
    assert sum(r["ratings"] for r in run_tally(local_store, RUN)) == 1  # `gsb tally` too

    local_store.write_json(f"{ratings_prefix(RUN)}/foreign.json", [1, 2])  # JSON, not a rating
    local_store.write_json(broken, new_rating(RUN, site.tasks[0], "zed", True, ANSWERS))  # repaired
    shown = client.get(tallies).text
    assert "1 unreadable rating file skipped" in shown
    assert sum(map(int, re.findall(r"<td class=ratings>(\d+)</td>", shown))) == 2


# -- what a rater sees (issue 13): blind pages, operator-only tallies, one screen, synced play --


def test_rating_pages_name_no_model(site: GSBSite):
    labels = set(MODELS) | {r["id"] for t in site.tasks for r in (t.candidate, t.baseline)}
    assert len(site.media) == 2 * len(site.tasks)  # a shared baseline video has an id per task
    client = TestClient(create_app(site))
    seen = [client.get("/"), client.post("/rater", data={"rater": "alice"}, follow_redirects=False)]
    media = []
    for _ in site.tasks:
        page = client.get("/rate")
        form = _hidden(page.text)
        media += re.findall(r"src='(/(?:video|ref)/[^']*)'", page.text)
        seen += [page,
                 client.post("/rate", data={**form, "video_quality": "good"}),  # 400 incomplete
                 client.post("/rate", data={**form, **ANSWERS, "token": "0" * 64}),  # 409 stale
                 client.post("/rate", data={**form, **ANSWERS, "task": "nope"}),  # 404
                 client.post("/rate", data={**form, **ANSWERS}, follow_redirects=False),  # 303
                 client.post("/rate", data={**form, **ANSWERS})]  # 409 already rated
    seen.append(client.get("/rate"))  # all rated
    assert len(media) == 3 * len(site.tasks)  # two videos and the reference frame per page
    seen += [client.get(m, headers={"Range": "bytes=0-99"}) for m in media]
    assert {r.status_code for r in seen} == {200, 206, 303, 400, 404, 409}
    for r in seen:
        binary = r.headers.get("content-type", "").startswith(("video/", "image/"))
        text = " ".join([str(r.url), "" if binary else r.text, *(f"{k}: {v}" for k, v in r.headers.items())])
        named = [label for label in labels if label.lower() in text.lower()]
        assert not named, f"{r.request.method} {r.url} ({r.status_code}) names {named}"


def test_tallies_are_for_the_operator_only(site: GSBSite, local_store: Store):
    client = _rater_client(site)
    pages = [client.get("/")]
    for _ in site.tasks:
        pages.append(client.get("/rate"))
        client.post("/rate", data={**_hidden(pages[-1].text), **ANSWERS})
    pages.append(client.get("/rate"))
    assert "you rated all 4 pairs" in pages[-1].text
    assert not [p.url for p in pages if "/tallies" in p.text]  # raters are not led to the results
    for refused in (client.get("/tallies"), client.get("/tallies?token=guess"),
                    client.get("/tallies", headers={"Authorization": "Bearer guess"}),
                    client.get(f"/tallies?token={GSBSite.load(local_store, RUN).operator_token}")):
        assert refused.status_code == 403 and "reg-dpo vs base" not in refused.text
    for served in (client.get(f"/tallies?token={site.operator_token}"),
                   client.get("/tallies", headers={"Authorization": f"Bearer {site.operator_token}"})):
        assert served.status_code == 200 and "<tr data-comparison='reg-dpo vs base'>" in served.text
    assert create_app(site).state.operator_token == site.operator_token


def test_serve_prints_the_operator_tallies_url(monkeypatch, local_store: Store):
    import uvicorn
    from flows.cli import app

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app_, **kw: served.update(app=app_, **kw))
    result = CliRunner().invoke(app, ["gsb", "serve", "--run", RUN, "--store", local_store.url, "--port", "9911"])
    assert result.exit_code == 0, result.output
    token = served["app"].state.operator_token
    assert f"http://127.0.0.1:9911/tallies?token={token}" in result.output
    client = TestClient(served["app"], base_url="http://127.0.0.1:9911")
    assert client.get(f"/tallies?token={token}").status_code == 200
    assert client.get("/tallies").status_code == 403


LONG_PROMPT = ("A slow dolly shot along a rain-soaked neon street at night, reflections rippling in "
               "puddles as a cyclist passes under flickering signs; " * 4).strip()

# A 1366x768 window (headless Chromium leaves a viewport of about 1366x625 inside it, less than
# a maximized browser on a 1366x768 screen) and a whole 1366x768 viewport.
VIEWPORTS = [None, (1366, 768)]

FIT_JS = """
const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
const labels = [...document.querySelectorAll('#rating input[type=radio]')].map(i => i.closest('label'));
const v = document.getElementById('video-left');
const scale = Math.min(v.clientWidth / v.videoWidth, v.clientHeight / v.videoHeight);
return {view: [innerWidth, innerHeight], dpr: devicePixelRatio,
        page: [document.documentElement.scrollWidth, document.documentElement.scrollHeight],
        boxes: ['video-left', 'video-right', 'submit', 'prompt'].map(i => box(document.getElementById(i)))
               .concat(labels.map(box)),
        radios: labels.length, shown: [v.videoWidth * scale, v.videoHeight * scale]};
"""


def _oriented_site(root: Path, size: tuple[int, int]) -> GSBSite:
    """An I2V run of base vs reg-dpo at one video size, a long prompt and a reference frame."""
    store = Store(f"file://{root / 'store'}")
    ref = store.put_file(_ref_frame(root / "ref.png", size), "items/evaluate/ref.png")
    rows = [{"id": f"p0-{m}-s0", "status": "ok", "reason": "", "prompt_id": "p0", "prompt": LONG_PROMPT,
             "model": m, "seed": 0, "ref": ref,
             "video": store.put_file(_clip(root / f"{m}.mp4", size, 90 * i, seconds=3),
                                     f"items/evaluate/{m}/video.mp4")}
            for i, m in enumerate(("base", "reg-dpo"))]
    commit_evaluate(store, rows)
    return GSBSite.load(store, RUN)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
@pytest.mark.parametrize("orientation,size", [("portrait", (144, 256)), ("landscape", (256, 144))])
def test_rating_page_fits_one_screen_and_plays_in_sync(orientation, size, chromium, tmp_path: Path):
    from selenium.webdriver.support.ui import WebDriverWait

    site = _oriented_site(tmp_path, size)
    with _server(create_app(site, LOOPBACK_HOSTS)) as url:
        _start_as(chromium, url, "alice")
        for viewport in VIEWPORTS:
            if viewport:
                chromium.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                    "width": viewport[0], "height": viewport[1], "deviceScaleFactor": 1, "mobile": False})
            chromium.get(f"{url}/rate")
            WebDriverWait(chromium, 30).until(lambda b: b.execute_script(
                "return [...document.querySelectorAll('video')].every(v => v.readyState >= 1)"))
            fit = chromium.execute_script(FIT_JS)
            (vw, vh), where = fit["view"], f"{orientation} at {fit['view']}"
            assert vw == 1366 and (vh <= 768 if viewport is None else [vw, vh] == list(viewport)), where
            assert fit["radios"] == 6, where
            for left, top, right, bottom in fit["boxes"]:
                assert 0 <= left and 0 <= top and right <= vw and bottom <= vh, f"{where}: {fit['boxes']}"
            assert fit["page"][0] <= vw and fit["page"][1] <= vh, f"{where}: the page scrolls"
            shown_w, shown_h = fit["shown"]  # the picture itself, letterboxed in its box
            assert shown_h >= 0.5 * vh if orientation == "portrait" else shown_w >= 0.4 * vw, (where, fit)
            shot = tmp_path / f"{orientation}-{vh}.png"
            assert chromium.save_screenshot(str(shot))
            assert _png_size(shot) == (vw * fit["dpr"], vh * fit["dpr"])

        # The sync script ran under the CSP: pausing or playing one side does the same to the other.
        WebDriverWait(chromium, 30).until(lambda b: b.execute_script("return window.gsbSync === true"),
                                          "the sync script did not run (refused by the CSP?)")
        chromium.execute_script("document.getElementById('video-left').pause()")
        WebDriverWait(chromium, 30).until(
            lambda b: b.execute_script("return document.getElementById('video-right').paused"),
            "pausing the left video did not pause the right one")
        chromium.execute_script("document.getElementById('video-right').play()")
        WebDriverWait(chromium, 30).until(
            lambda b: b.execute_script("return !document.getElementById('video-left').paused"),
            "playing the right video did not play the left one")
    refused = [e["message"] for e in chromium.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not refused
