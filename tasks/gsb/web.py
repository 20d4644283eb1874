"""The GSB rating page: a small FastAPI app over one run's evaluate videos and stored ratings.

Pages: `/` (rater id), `/rate` (the next A/B task, POST stores a rating), `/tallies` (the
paper's GSB table, operator only), `/video/<media id>` and `/ref/<media id>` (media).

Blind by construction: raters see no model label anywhere (HTML, form fields, media URLs,
headers). A video is named by a media id, an HMAC of (task, evaluate row) under the server's
secret, so the id says nothing about the model and differs between tasks (the baseline's video
of a prompt is not recognisable across comparisons); only the server maps it back.

The tallies are the operator's: `/tallies` wants the operator token (made at app build,
`site.operator_token`, printed by `serve`) as `?token=` or `Authorization: Bearer`; rating
pages do not link to it, so raters do not see results while rating.

Safety by construction:
- media is looked up by media id only; the URI comes from the committed manifest and must
  resolve inside the store (`Store.key_of`), so no request path reaches a file; unknown ids
  are 404;
- raters can only create ratings (no update or delete endpoint), one per rater and pair
  (`RatingLog.create`, atomic); every form carries an HMAC of (rater, task, left media id) from
  this server, so sides cannot be forged and other sites cannot post ratings; request bodies
  are capped; every data value is HTML-escaped; a strict CSP allows one script, the play/pause
  sync below, by its hash;
- `serve` binds 127.0.0.1 unless told otherwise, and then accepts only localhost Host headers.
On an S3 store whose server ignores `If-None-Match` (see `tasks.gsb.ratings`), one `gsb serve`
process must serve a run.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import ipaddress
import logging
import posixpath
import random
import secrets
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from infra.store import PathEscapeError, Store
from tasks.gsb.ratings import (
    ASPECTS, LABELS, Comparison, RatingLog, RatingTask, check_rater, comparisons, counted,
    evaluate_rows, format_score, new_rating, rating_tasks, tally,
)

log = logging.getLogger("regdpo.gsb")

COOKIE = "gsb_rater"
MAX_BODY = 4096  # a rating form is ~300 bytes
CHUNK = 1 << 20
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}

# Play/pause/seek of one video follow on the other, so both sides are watched in step. An
# `align`ed video's own `seeked` is not echoed back (it would ping-pong while playing).
SYNC_JS = """(() => {
  const a = document.getElementById('video-left'), b = document.getElementById('video-right');
  if (!a || !b) return;
  const other = v => (v === a ? b : a), aligned = new Set();
  const align = (v, t) => { aligned.add(v); v.currentTime = t; };
  for (const v of [a, b]) {
    v.addEventListener('play', () => { const o = other(v); if (o.paused) { align(o, v.currentTime); o.play().catch(() => {}); } });
    v.addEventListener('pause', () => { const o = other(v); if (!o.paused) o.pause(); });
    v.addEventListener('seeked', () => { if (!aligned.delete(v)) align(other(v), v.currentTime); });
  }
  document.getElementById('play-both').addEventListener('click', () => (a.paused ? a.play() : a.pause()));
  document.getElementById('restart-both').addEventListener('click', () => { a.currentTime = 0; a.play(); });
  window.gsbSync = true;
})();"""
SYNC_JS_HASH = "sha256-" + base64.b64encode(hashlib.sha256(SYNC_JS.encode()).digest()).decode()
SECURITY_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; script-src '{SYNC_JS_HASH}'; media-src 'self'; "
                               "img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # also keeps the operator's ?token= out of Referer
}
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]

# What the rater reads: the paper's definitions (§4.1, A.6), judged left vs right.
ASPECT_HELP = {
    "video_quality": "overall visual appeal and smoothness: sharpness, artifacts, flicker, natural motion",
    "prompt_following": "consistency between the video and its input: the prompt text "
                        "(and the reference frame, when one is shown)",
}
CHOICES = {"good": "Good: left is better", "same": "Same: equivalent", "bad": "Bad: left is worse"}


@dataclass
class GSBSite:
    """Everything the app serves for one run, built once from the committed evaluate manifest."""

    store: Store
    run: str
    comps: list[Comparison]
    tasks: list[RatingTask]
    ratings: RatingLog
    rng: random.Random = field(default_factory=random.SystemRandom)
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    operator_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    @classmethod
    def load(cls, store: Store, run: str, pairs: list[str] | None = None, **kw) -> "GSBSite":
        rows = evaluate_rows(store, run)
        comps = comparisons(rows, pairs)
        return cls(store, run, comps, rating_tasks(rows, comps), RatingLog(store, run), **kw)

    def media_id(self, task: RatingTask, row: dict) -> str:
        """What raters see of a video: opaque, per task, meaningful only to this server."""
        return self._mac(f"media|{task.id}|{row['id']}")[:32]

    @cached_property
    def media(self) -> dict[str, dict]:
        """The only rows whose media may be served, by media id: the videos of the tasks."""
        return {self.media_id(t, r): r for t in self.tasks for r in (t.candidate, t.baseline)}

    def sign(self, rater: str, task_id: str, left: str) -> str:
        return self._mac(f"form|{rater}|{task_id}|{left}")

    def is_operator(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        given = auth[len("Bearer "):] if auth.startswith("Bearer ") else request.query_params.get("token", "")
        return hmac.compare_digest(given.encode(), self.operator_token.encode())

    def _mac(self, message: str) -> str:
        return hmac.new(self.secret, message.encode(), hashlib.sha256).hexdigest()

    def tally(self) -> list[dict]:
        return tally(self.ratings.refresh(), self.tasks, self.comps)

    def next_task(self, rater: str) -> tuple[RatingTask | None, int]:
        """(the next task this rater has not rated, how many they rated): least-rated tasks
        first so coverage grows evenly, in a per-rater shuffled order."""
        done = counted(self.ratings.refresh(), self.tasks)
        mine = {r["task"] for r in done if r["rater"] == rater}
        per_task = {t.id: 0 for t in self.tasks}
        for r in done:
            per_task[r["task"]] += 1
        todo = [t for t in self.tasks if t.id not in mine]
        random.Random(rater).shuffle(todo)
        todo.sort(key=lambda t: per_task[t.id])
        return (todo[0] if todo else None), len(mine)


def create_app(site: GSBSite, allowed_hosts: list[str] | None = None) -> FastAPI:
    app = FastAPI(title="GSB rating", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.operator_token = site.operator_token
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["*"])

    @app.middleware("http")
    async def limits_and_headers(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and (not length.isdigit() or int(length) > MAX_BODY):
            return _page("Too large", f"<p>Requests are limited to {MAX_BODY} bytes.</p>", 413)
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request):
        return _page("GSB rating", _rater_form(request.cookies.get(COOKIE, "")) + _about(site))

    @app.post("/rater")
    async def set_rater(request: Request):
        form = await _form(request)
        try:
            rater = check_rater(form.get("rater", ""))
        except ValueError as e:
            return _page("Rater id", f"<p class=err>{_e(e)}</p>{_rater_form('')}", 400)
        response = RedirectResponse("/rate", status_code=303)
        response.set_cookie(COOKIE, rater, httponly=True, samesite="strict", max_age=30 * 86400)
        return response

    @app.get("/rate", response_class=HTMLResponse)
    def rate_page(request: Request):
        rater = _rater(request)
        if rater is None:
            return RedirectResponse("/", status_code=303)
        task, n_done = site.next_task(rater)
        if task is None:
            return _page("All rated", f"<p>Thank you, {_e(rater)}: you rated all {len(site.tasks)} pairs.</p>")
        candidate_left = site.rng.random() < 0.5  # sides randomized per page shown
        return _page("GSB rating", _task_form(site, task, rater, candidate_left, n_done),
                     page_class="rate", sync=True)

    @app.post("/rate")
    async def rate_submit(request: Request):
        rater = _rater(request)
        if rater is None:
            return RedirectResponse("/", status_code=303)
        form = await _form(request)
        return await run_in_threadpool(_store_rating, site, rater, form)  # store I/O off the loop

    @app.get("/tallies", response_class=HTMLResponse)
    def tallies_page(request: Request):
        if not site.is_operator(request):
            return _page("Operator only", "<p class=err>The tallies are for the operator: open the "
                         "URL that <code>regdpo gsb serve</code> printed (it carries the token).</p>",
                         403, nav=False)
        rows = site.tally()
        return _page("GSB tallies", _tallies_table(site, rows, len(site.ratings.unreadable)), nav=False)

    @app.get("/video/{media_id}")
    def video(media_id: str, request: Request):
        row = site.media.get(media_id)
        return _media(site.store, row and row.get("video"), {".mp4": "video/mp4"}, request)

    @app.get("/ref/{media_id}")
    def ref(media_id: str, request: Request):
        row = site.media.get(media_id)
        return _media(site.store, row and row.get("ref"), IMAGE_TYPES, request)

    return app


# -- ratings ---------------------------------------------------------------------------------


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form of single-valued fields, at most MAX_BODY bytes even when chunked."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        _bad_form("send the form as application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            _bad_form(f"the form is larger than {MAX_BODY} bytes", 413)
    try:
        fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=16)
    except ValueError:
        _bad_form("the form has too many fields")
    if any(len(v) != 1 for v in fields.values()):
        _bad_form("each form field may appear once")
    return {k: v[0] for k, v in fields.items()}


def _bad_form(msg: str, status: int = 400) -> None:
    raise HTTPException(status_code=status, detail=msg)


def _store_rating(site: GSBSite, rater: str, form: dict[str, str]):
    task = next((t for t in site.tasks if t.id == form.get("task")), None)
    if task is None:
        return _page("Unknown pair", "<p class=err>That pair is not part of this run. "
                     "<a href='/rate'>Get the next pair</a>.</p>", 404)
    left = form.get("left", "")
    sides = {site.media_id(task, task.candidate): True, site.media_id(task, task.baseline): False}
    if left not in sides or not hmac.compare_digest(site.sign(rater, task.id, left), form.get("token", "")):
        return _page("Stale form", "<p class=err>This form was not issued to you by this server "
                     "(it may predate a restart). <a href='/rate'>Load a fresh pair</a>.</p>", 409)
    shown = {a: form.get(a, "") for a in ASPECTS}
    missing = [ASPECTS[a] for a, v in shown.items() if v not in LABELS]
    if missing:
        return _page("Incomplete", f"<p class=err>Choose Good, Same or Bad for {_e(', '.join(missing))}."
                     " <a href='/rate'>Back to rating</a>.</p>", 400)
    # The create is what makes one rating per (rater, pair) exact under concurrent submits;
    # the check also finds ratings stored under older, per-submission keys.
    rated = any(r["rater"] == rater for r in counted(site.ratings.refresh(), [task]))
    if rated or not site.ratings.create(new_rating(site.run, task, rater, sides[left], shown)):
        return _page("Already rated", "<p>You already rated this pair; your first rating stands. "
                     "<a href='/rate'>Next pair</a>.</p>", 409)
    return RedirectResponse("/rate", status_code=303)


def _rater(request: Request) -> str | None:
    try:
        return check_rater(request.cookies.get(COOKIE, ""))
    except ValueError:
        return None


# -- media -----------------------------------------------------------------------------------


def _media(store: Store, uri, types: dict[str, str], request: Request) -> Response:
    """Bytes of a manifest-listed store object, with single-range support so <video> can seek."""
    try:
        key = store.key_of(uri) if isinstance(uri, str) else None
    except PathEscapeError as e:
        log.warning("refusing to serve %s: %s", uri, e)
        key = None
    media_type = key and types.get(posixpath.splitext(key)[1].lower())
    if not media_type or not store.exists(key):
        return Response("not found", status_code=404, media_type="text/plain")
    path = store.path(key)
    size = store.fs.size(path)
    try:
        span = byte_range(request.headers.get("range"), size)
    except ValueError:
        return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    start, end = span or (0, size - 1)
    headers = {"Accept-Ranges": "bytes", "Content-Length": str(end - start + 1), "Cache-Control": "no-store"}
    if span:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return StreamingResponse(_read(store, path, start, end), status_code=206 if span else 200,
                             media_type=media_type, headers=headers)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `bytes=` range, or None for the whole object.

    Malformed or multi-range headers are ignored (RFC 9110 §14.2 lets a server send the whole
    object); a syntactically valid range that misses the object raises ValueError (416)."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, sep, last = header[len("bytes="):].strip().partition("-")
    if not sep or not (first.isdigit() or (not first and last.isdigit())) or (last and not last.isdigit()):
        return None
    if not first:  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise ValueError("empty suffix range")
        return max(size - n, 0), size - 1
    start, end = int(first), int(last) if last else size - 1
    if start >= size or end < start:
        raise ValueError("range outside the object")
    return start, min(end, size - 1)


def _read(store: Store, path: str, start: int, end: int) -> Iterator[bytes]:
    with store.fs.open(path, "rb") as f:
        f.seek(start)
        left = end - start + 1
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk


# -- HTML ------------------------------------------------------------------------------------

# The rating page is one screen (1366x768 and smaller): the videos take whatever height the
# prompt, the questions and the submit button leave, and are letterboxed inside it (portrait
# or landscape alike), so the answers never fall below the fold.
_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;color:#222}
body.rate{box-sizing:border-box;height:100vh;min-height:30em;margin:0 auto;padding:.4em 1em;
display:flex;flex-direction:column;gap:.35em}
.rate h1{font-size:1.1em;margin:0}.rate p{margin:0}
.top{display:flex;gap:1em;align-items:flex-start}img.ref{max-height:4.6em}
.prompt{flex:1;font-size:1.1em;background:#f4f4f4;padding:.3em .6em;border-radius:4px;
white-space:pre-wrap;max-height:4.2em;overflow:auto}
.pair{flex:1;min-height:0;display:flex;gap:1em}.side{flex:1;min-width:0;display:flex;flex-direction:column}
.side h2{font-size:1em;margin:0 0 .2em}.screen{flex:1;min-height:0;position:relative;background:#000}
.screen video{position:absolute;inset:0;width:100%;height:100%;object-fit:contain}
.sync{display:flex;gap:.6em;align-items:center}.sync .note{margin-left:auto}
.answers{display:flex;gap:1em;align-items:center}.answers fieldset{flex:1;margin:0;padding:.2em .6em .4em}
.help{display:block;font-size:.85em;color:#555}
fieldset{margin:.8em 0;border:1px solid #bbb}label{margin-right:1.2em;cursor:pointer;white-space:nowrap}
table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.3em .7em;text-align:center}
.err{color:#b00}.note{color:#555;font-size:.9em}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: str, status: int = 200, page_class: str = "", sync: bool = False,
          nav: bool = True) -> HTMLResponse:
    """A page; `sync` adds SYNC_JS, the one script the CSP allows."""
    links = "<p class=note><a href='/rate'>Rate</a> · <a href='/'>Rater id</a></p>" if nav else ""
    doc = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
           f"<style>{_STYLE}</style></head><body class='{page_class}'><h1>{_e(title)}</h1>{body}{links}"
           + (f"<script>{SYNC_JS}</script>" if sync else "") + "</body></html>")
    return HTMLResponse(doc, status_code=status, headers={"Cache-Control": "no-store"})


def _rater_form(current: str) -> str:
    return ("<form method=post action='/rater'><label>Your rater id "
            f"<input name=rater id=rater required maxlength=64 value='{_e(current)}'></label>"
            "<button type=submit id=start>Start rating</button></form>")


def _about(site: GSBSite) -> str:
    return (f"<p>{len(site.tasks)} pairs to rate. Each page shows two videos made from the same "
            "prompt by two models, on randomly chosen sides. Judge the <b>left</b> video against "
            "the <b>right</b> one: Good = the left video is better, Same = they are equivalent, "
            "Bad = the left video is worse.</p>")


def _task_form(site: GSBSite, task: RatingTask, rater: str, candidate_left: bool, n_done: int) -> str:
    left, right = (task.candidate, task.baseline) if candidate_left else (task.baseline, task.candidate)
    left_id, right_id = site.media_id(task, left), site.media_id(task, right)
    ref = (f"<img class=ref alt='reference frame (the input image)' title='reference frame (the input image)' "
           f"src='/ref/{left_id}'>" if _is_image(left.get("ref")) else "")
    aspects = "".join(_aspect_fieldset(a) for a in ASPECTS)
    return (
        f"<div class=top><div class=prompt id=prompt>{_e(task.prompt)}</div>{ref}</div>"
        f"<div class=pair>{_side('left', 'Left video', left_id)}{_side('right', 'Right video', right_id)}</div>"
        "<div class=sync><button type=button id=play-both>Play / pause both</button>"
        "<button type=button id=restart-both>Restart both</button>"
        f"<span class=note>Rater <b>{_e(rater)}</b> · you rated {n_done} of {len(site.tasks)} pairs</span></div>"
        "<form method=post action='/rate' id=rating class=answers>"
        f"<input type=hidden name=task value='{_e(task.id)}'>"
        f"<input type=hidden name=left value='{left_id}'>"
        f"<input type=hidden name=token value='{site.sign(rater, task.id, left_id)}'>"
        f"{aspects}<button type=submit id=submit>Submit and next</button></form>"
    )


def _side(side: str, title: str, media_id: str) -> str:
    return (f"<div class=side><h2>{title}</h2><div class=screen><video id='video-{side}' "
            f"src='/video/{media_id}' controls loop muted autoplay playsinline preload=auto>"
            "</video></div></div>")


def _aspect_fieldset(aspect: str) -> str:
    radios = "".join(
        f"<label><input type=radio required name={aspect} id='{aspect}-{label}' value={label}> "
        f"{_e(text)}</label>" for label, text in CHOICES.items())
    return (f"<fieldset><legend><b>{ASPECTS[aspect]}</b></legend>"
            f"<span class=help>{_e(ASPECT_HELP[aspect])}</span>{radios}</fieldset>")


def _is_image(uri) -> bool:
    return isinstance(uri, str) and posixpath.splitext(uri)[1].lower() in IMAGE_TYPES


def _tallies_table(site: GSBSite, rows: list[dict], unreadable: int) -> str:
    head = ("<tr><th>Comparison (A vs B)</th><th>Pairs</th><th>Raters</th><th>Ratings</th><th>VQ</th>"
            "<th>VQ Score</th><th>PF</th><th>PF Score</th></tr>")
    body = "".join(
        f"<tr data-comparison='{_e(r['comparison'])}'><td>{_e(r['comparison'])}</td>"
        f"<td>{r['tasks']}</td><td>{r['raters']}</td><td class=ratings>{r['ratings']}</td>"
        + "".join(f"<td class={a}>{_gsb(r[a])}</td><td class={a}-score>{format_score(r[a]['score'])}</td>"
                  for a in ASPECTS) + "</tr>" for r in rows)
    skipped = (f"<p class=err id=unreadable>{unreadable} unreadable rating file{'s' * (unreadable != 1)} "
               "skipped (the server log names them)</p>" if unreadable else "")
    return (f"<p>Run <b>{_e(site.run)}</b>. Results for VQ (Video Quality) and PF (Prompt Following) "
            "in the format Good/Same/Bad of A (the candidate) against B (the baseline), as in the "
            "paper's Tables 1, 3, 4 and 8; Score = (Good + Same) / (Same + Bad), above 1 when A is "
            "preferred. ∞: no Same or Bad answers yet (A won every rating); –: no ratings. "
            "Each rater's first rating of a pair counts.</p>"
            f"<table id=tallies>{head}{body}</table>{skipped}")


def _gsb(counts: dict) -> str:
    return " / ".join(str(counts[label]) for label in LABELS)


# -- serving ---------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def build_app(store_url: str, run: str, pairs: list[str] | None = None, host: str = "127.0.0.1") -> FastAPI:
    """The app for `regdpo gsb serve`: localhost Host headers only when bound to loopback
    (a DNS-rebinding page cannot talk to it); any Host when deliberately exposed. The
    operator token for /tallies is `app.state.operator_token`."""
    site = GSBSite.load(Store(store_url), run, pairs)
    return create_app(site, LOOPBACK_HOSTS if is_loopback(host) else None)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8765) -> None:
    import uvicorn

    if not is_loopback(host):
        log.warning("GSB page bound to %s: anyone who can reach it can add ratings under any rater id", host)
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    print(f"GSB tallies, for the operator only (do not share): "
          f"http://{netloc}/tallies?token={app.state.operator_token}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False,
                limit_concurrency=64, h11_max_incomplete_event_size=16 * 1024)
