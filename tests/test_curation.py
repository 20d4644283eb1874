"""Curation on the toy clips: each filter rejects its own kind, acquire's metadata criteria,
normalize's GT spec proven by probing the outputs of one whole curation flow run, and the
same flow with the store on a real S3 server."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from conftest import toy_config
from infra.config import AcquireConfig, FilterConfig
from infra.stage import stage_dir
from infra.store import SUCCESS, Store
from infra.video import FFPROBE, ProbeError, probe
from tasks.acquire import criteria
from tasks.filter import analyze, decide
from tasks.toy_data import CLEAN, REJECTS

STAGES = ("acquire", "filter", "normalize")
# The filter reason each rejection kind must get (acquire kinds are handled by `criteria`).
FILTER_KIND_REASON = {"static": "static", "cuts": "cuts", "flash": "effects", "fade": "effects",
                      "text": "text", "slideshow": "slideshow"}
ACQUIRE_KIND_WORDS = {"short": "duration", "small": "short edge", "fps": "frame rate"}
FILTER_REJECTS = [c for c in REJECTS if c.kind in FILTER_KIND_REASON]
ACQUIRE_REJECTS = [c for c in REJECTS if c.kind in ACQUIRE_KIND_WORDS]
SCORE_COLUMNS = ("decoded_frames", "expected_frames", "motion", "motion_max", "cuts",
                 "fade_fraction", "flash_sizes", "still_fraction", "still_images", "text_area",
                 "text_area_mean", "text_sample")
BUCKET_SIZE = {"16:9": (1280, 720), "9:16": (720, 1280), "3:4": (720, 960), "1:1": (720, 720)}
# Every clip that must come out of curation as a GT clip, with its bucket.
EXPECTED_OK = {
    "clean_landscape_30fps.mp4": "16:9",
    "clean_portrait_24fps.mp4": "9:16",
    "clean_3x4_25fps.mp4": "3:4",
    "clean_square_30fps.mp4": "1:1",
    "clean_small_16x9_25fps.mp4": "16:9",
    "rotated_phone.mp4": "9:16",  # coded 1280x720, displayed portrait
    "odd_dims.mp4": "16:9",
    "tenbit.mp4": "16:9",
    "vfr.mp4": "16:9",
    "name with spaces ü ñ.mp4": "16:9",
    "-dash; $(rm -rf x).mp4": "16:9",
}


def clip_path(toy_dir: Path, clip) -> str:
    return str(toy_dir / "clips" / f"{clip.name}.mp4")


def ffprobe_stream(path: str) -> dict:
    """An independent ffprobe of the first video stream, decoding every frame to count them."""
    out = subprocess.run(
        [FFPROBE, "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_streams",
         "-of", "json", "file:" + os.path.abspath(path)],
        capture_output=True, check=True, timeout=120,
    )
    streams = json.loads(out.stdout)["streams"]
    assert len(streams) == 1, streams
    return streams[0]


def stream_rotation(stream: dict) -> float:
    rot = 0.0
    for side in stream.get("side_data_list") or []:
        rot = float(side.get("rotation", rot))
    return rot or float((stream.get("tags") or {}).get("rotate", 0))


def by_name(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for row in rows:
        name = os.path.basename(row["source"])
        assert name not in out, f"two rows for {name}"
        out[name] = row
    return out


# -- filters, called directly (no Prefect) ---------------------------------------------------


@pytest.fixture(scope="module")
def scores(toy_dir: Path) -> dict[str, dict]:
    """Every filter score of every clean and filter-reject toy clip (one decode each)."""
    signals = FilterConfig().signals
    clips = CLEAN + FILTER_REJECTS

    def one(clip):
        path = clip_path(toy_dir, clip)
        return clip.name, analyze(path, probe(path), signals)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, clips))


@pytest.mark.parametrize("clip", FILTER_REJECTS, ids=lambda c: c.kind)
def test_filter_rejects_its_own_kind(clip, scores):
    cfg = FilterConfig()
    reasons = decide(scores[clip.name], cfg)
    want = FILTER_KIND_REASON[clip.kind]
    assert reasons, f"{clip.name} passed every filter: {scores[clip.name]}"
    # The row's reason is the first in priority order: it must be the clip's own kind.
    assert reasons[0] == want, f"{clip.name}: reasons {reasons}, scores {scores[clip.name]}"


@pytest.mark.parametrize("clip", CLEAN, ids=lambda c: c.name)
def test_filters_pass_clean_moving_clips(clip, scores):
    s = scores[clip.name]
    assert decide(s, FilterConfig()) == [], f"{clip.name} rejected: {s}"
    assert s["decoded_frames"] == s["expected_frames"] and s["motion"] >= FilterConfig().motion_min


@pytest.mark.parametrize("pix_fmt,codec", [("yuv411p", "ffv1"), ("pal8", "png"),
                                           ("yuv420p10le", "libx264"), ("rgb48be", "png")])
def test_sources_in_any_pixel_format_are_analysed_and_normalized(tmp_path, pix_fmt, codec):
    """zimg (the resize) takes planar formats subsampled at most 2x: DV's 4:1:1, a palette,
    10 bits or 16-bit RGB are converted first: the analysis frames are those of the same
    source in 8-bit 4:2:0 up to the formats' own chroma and rounding, and the GT clip is made."""
    from infra.config import NormalizeConfig
    from infra.gtspec import normalize_file
    from infra.video import decode_frames

    def source(pix_fmt: str, codec: str) -> Path:
        src = tmp_path / f"{pix_fmt}.{'mp4' if codec == 'libx264' else 'mkv'}"
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=s=320x180:r=16:d=5.2",
                        "-c:v", codec, "-pix_fmt", pix_fmt, "-crf", "0", str(src)], check=True)
        return src

    src, plain = source(pix_fmt, codec), source("yuv420p", "libx264")
    info = probe(src)
    assert info.pix_fmt == pix_fmt
    frames = decode_frames(str(src), info, 90)
    want = decode_frames(str(plain), probe(plain), 90)
    assert frames.shape == want.shape == (84, 90, 160, 3)
    assert abs(frames.astype(float) - want).mean() < 10  # a full/limited range mix-up: 13
    spec = normalize_file(str(src), info, NormalizeConfig(short_edge=176), str(tmp_path / "gt.mp4"),
                          str(tmp_path / "ref.png"))
    assert (spec["width"], spec["height"], spec["frames"], spec["pix_fmt"]) == (320, 176, 81, "yuv420p")


def test_thresholds_decide_without_decoding(scores):
    """Loosening one threshold lets its kind through; the scores stay the same."""
    static = scores["reject_static"]
    assert decide(static, FilterConfig(motion_min=0.0)) == []
    text = scores["reject_text"]
    assert decide(text, FilterConfig(text_area_max=1.0)) == []
    cuts = scores["reject_cuts"]
    assert decide(cuts, FilterConfig(max_cuts=cuts["cuts"])) == []


# -- acquire criteria --------------------------------------------------------------------------


@pytest.mark.parametrize("clip", ACQUIRE_REJECTS, ids=lambda c: c.kind)
def test_acquire_criteria_reject_their_kind(clip, toy_dir):
    reasons = criteria(probe(clip_path(toy_dir, clip)), AcquireConfig())
    assert len(reasons) == 1, reasons
    assert ACQUIRE_KIND_WORDS[clip.kind] in reasons[0]


def test_acquire_criteria_keep_the_rest(toy_dir):
    for clip in CLEAN + FILTER_REJECTS:
        assert criteria(probe(clip_path(toy_dir, clip)), AcquireConfig()) == [], clip.name


# -- one curation flow over all the toy data -------------------------------------------------


@pytest.fixture(scope="module")
def curated(prefect_api, toy_dir: Path, tmp_path_factory) -> SimpleNamespace:
    from flows.pipeline import curate

    url = f"file://{tmp_path_factory.mktemp('curation') / 'store'}"
    cfg = toy_config(toy_dir, url)
    result = curate(run="toy-curation", config=cfg)
    store = Store(url)
    rows, success = {}, {}
    for stage in STAGES:
        table, success[stage] = store.read_manifest(stage_dir(stage, result[stage]["key"]))
        rows[stage] = table.to_pylist()
    with open(toy_dir / "captions.csv", newline="") as f:
        captions = {r["video"]: r["caption"] for r in csv.DictReader(f)}
    return SimpleNamespace(store=store, result=result, rows=rows, success=success, captions=captions)


def test_run_index_names_each_committed_stage(curated):
    index = curated.store.read_run("toy-curation")
    for stage in STAGES:
        assert index["stages"][stage]["key"] == curated.result[stage]["key"]
        assert curated.store.is_committed(stage_dir(stage, curated.result[stage]["key"]))
        assert curated.success[stage]["rows"] == len(curated.rows[stage])
        counts = curated.success[stage]["counts"]
        assert sum(counts.values()) == len(curated.rows[stage]) and counts["failed"] == 0


def test_every_row_has_id_status_reason(curated):
    for stage, rows in curated.rows.items():
        assert rows, stage
        for row in rows:
            assert row["id"] and row["status"] in ("ok", "rejected"), (stage, row)
            assert isinstance(row["reason"], str), (stage, row)
            if row["status"] == "rejected":
                assert row["reason"].strip(), (stage, row)
            else:
                assert row["reason"] == "", (stage, row)


def test_every_filtered_row_records_every_score(curated):
    rows = curated.rows["filter"]
    assert len(rows) == len(curated.rows["normalize"]) + len(FILTER_REJECTS)
    for row in rows:
        missing = [c for c in SCORE_COLUMNS if row.get(c) is None]
        assert not missing, f"{row['source']}: no {missing}"


def test_flow_rejects_each_kind_with_its_reason(curated):
    acquired, filtered = by_name(curated.rows["acquire"]), by_name(curated.rows["filter"])
    for clip in FILTER_REJECTS:
        row = filtered[f"{clip.name}.mp4"]
        want = FILTER_KIND_REASON[clip.kind]
        assert row["status"] == "rejected" and row["reasons"][0] == want, row
        assert row["reason"].startswith(want + ":"), row["reason"]
    for clip in ACQUIRE_REJECTS:
        row = acquired[f"{clip.name}.mp4"]
        assert row["status"] == "rejected" and ACQUIRE_KIND_WORDS[clip.kind] in row["reason"], row
        assert f"{clip.name}.mp4" not in filtered


def test_exactly_the_good_clips_come_out(curated):
    final = by_name(curated.rows["normalize"])
    assert {n for n, r in final.items() if r["status"] == "ok"} == set(EXPECTED_OK)
    # The odd inputs among them: rotation honoured, odd sizes / 10-bit / VFR normalized.
    assert (final["rotated_phone.mp4"]["width"], final["rotated_phone.mp4"]["height"]) == (720, 1280)
    for name in ("odd_dims.mp4", "tenbit.mp4", "vfr.mp4"):
        assert final[name]["status"] == "ok" and final[name]["bucket"] == "16:9"


@pytest.mark.parametrize("name", sorted(EXPECTED_OK))
def test_normalized_clip_meets_the_gt_spec(curated, name):
    row = by_name(curated.rows["normalize"])[name]
    bucket = EXPECTED_OK[name]
    want_w, want_h = BUCKET_SIZE[bucket]
    assert row["status"] == "ok" and row["bucket"] == bucket
    video = curated.store.local_path(curated.store.key_of(row["video"]))
    ref = curated.store.local_path(curated.store.key_of(row["ref_image"]))
    assert os.path.isfile(video) and os.path.isfile(ref)

    s = ffprobe_stream(video)
    assert s["codec_name"] == "h264"
    assert (s["width"], s["height"]) == (want_w, want_h)
    assert s["pix_fmt"] == "yuv420p"
    assert Fraction(s["avg_frame_rate"]) == 16 and Fraction(s["r_frame_rate"]) == 16
    assert int(s["nb_read_frames"]) == 81
    assert stream_rotation(s) == 0
    info = probe(video)
    assert info.rotation == 0 and (info.display_width, info.display_height) == (want_w, want_h)
    with Image.open(ref) as im:
        assert im.format == "PNG" and im.size == (want_w, want_h)


def test_a_re_encode_is_byte_identical(curated, tmp_path):
    """A truncated or lost GT clip is re-encoded on a later run (maybe on another machine, under
    load): the bytes must match what the row recorded, or every key downstream moves. x264's
    frame threads broke this (2 distinct files in 6 encodes under load)."""
    from infra.config import NormalizeConfig
    from infra.gtspec import normalize_file

    cfg = NormalizeConfig.model_validate(curated.success["normalize"]["config"])
    filtered = by_name(curated.rows["filter"])
    jobs = []
    for name, row in by_name(curated.rows["normalize"]).items():
        if row["status"] == "ok":
            src = curated.store.local_path(curated.store.key_of(filtered[name]["video"]))
            committed = curated.store.local_path(curated.store.key_of(row["video"]))
            jobs += [(src, committed, tmp_path / f"{i}-{row['item_key']}") for i in range(3)]

    def encode(job):
        src, committed, out = job
        out.mkdir()
        normalize_file(src, probe(src), cfg, str(out / "gt.mp4"), str(out / "ref.png"))
        return (out / "gt.mp4").read_bytes() == Path(committed).read_bytes()

    with ThreadPoolExecutor(4) as pool:  # concurrent, as the stage's workers run
        same = list(pool.map(encode, jobs))
    assert jobs and all(same), [str(j[1]) for j, ok in zip(jobs, same) if not ok]
    # The race shows only now and then on small clips: also read the settings x264 wrote into
    # each stream (its SEI) and require one frame thread.
    for _, committed, _ in jobs:
        sei = re.search(rb" threads=(\d+) ", Path(committed).read_bytes())
        assert sei and sei.group(1) == b"1", committed


def test_prompts(curated):
    rows = by_name(curated.rows["normalize"])
    captioned = 0
    for name, row in rows.items():
        assert row["prompt"] and row["prompt"].strip(), name
        source_caption = curated.captions.get(name)
        if source_caption:
            assert row["prompt"] == source_caption and row["prompt_source"] == "source", name
        else:
            assert row["prompt_source"].startswith("caption:"), (name, row["prompt_source"])
            captioned += 1
    assert rows["clean_square_30fps.mp4"]["prompt_source"].startswith("caption:")
    assert captioned == 1 + 6  # the uncaptioned clean clip + the six good edge clips (a folder)


# -- the same curation with the store on S3 ----------------------------------------------------


@pytest.mark.slow
def test_curation_with_store_on_s3(prefect_api, toy_dir, s3_store_url, s3_admin_fs, tmp_path):
    from flows.pipeline import curate

    subset = ["clean_landscape_30fps.mp4", "clean_portrait_24fps.mp4", "reject_static.mp4"]
    manifest = tmp_path / "subset.csv"
    with open(toy_dir / "captions.csv", newline="") as f:
        keep = [r for r in csv.DictReader(f) if r["video"] in subset]
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(keep[0]))
        writer.writeheader()
        writer.writerows(keep)
    cfg = toy_config(toy_dir, s3_store_url, acquire={"sources": [
        {"manifest": str(manifest), "video_root": str(toy_dir / "clips")}]})

    result = curate(run="s3-curation", config=cfg)

    store = Store(s3_store_url)
    assert not store.local
    bucket_prefix = s3_store_url[len("s3://"):]
    index = store.read_run("s3-curation")
    rows = {}
    for stage in STAGES:
        key = result[stage]["key"]
        assert index["stages"][stage]["key"] == key
        # Committed on the server itself: seen by a separate S3 client.
        assert s3_admin_fs.exists(f"{bucket_prefix}/stages/{stage}/{key}/{SUCCESS}")
        assert s3_admin_fs.exists(f"{bucket_prefix}/stages/{stage}/{key}/manifest.parquet")
        table, success = store.read_manifest(stage_dir(stage, key))
        assert success["manifest"] == f"stages/{stage}/{key}/manifest.parquet"  # store-relative
        rows[stage] = by_name(table.to_pylist())
    assert {n: r["status"] for n, r in rows["acquire"].items()} == dict.fromkeys(subset, "ok")
    assert rows["filter"]["reject_static.mp4"]["status"] == "rejected"
    assert rows["filter"]["reject_static.mp4"]["reasons"][0] == "static"
    final = rows["normalize"]
    assert set(final) == set(subset[:2]) and all(r["status"] == "ok" for r in final.values())
    for name, row in final.items():
        for col in ("video", "ref_image"):
            key = row[col]
            assert "://" not in key and key.startswith("items/normalize/"), key
            assert store.exists(key) and s3_admin_fs.exists(f"{bucket_prefix}/{key}")
        assert row["prompt"] == next(r["caption"] for r in keep if r["video"] == name)
    for row in rows["acquire"].values():
        assert row["video"].startswith("objects/")
    # One GT clip read back from S3 meets the spec.
    row = final["clean_portrait_24fps.mp4"]
    with store.local_copy(store.key_of(row["video"])) as local:
        s = ffprobe_stream(local)
    assert (s["width"], s["height"], s["pix_fmt"], int(s["nb_read_frames"])) == (720, 1280, "yuv420p", 81)
    assert Fraction(s["avg_frame_rate"]) == 16


@pytest.mark.slow
def test_the_fused_decode_gives_the_stage_by_stage_outputs(prefect_api, toy_dir, tmp_path,
                                                           monkeypatch):
    """curate fuses filter's decode with normalize's encode for new clips (one ffmpeg pass);
    running the stages one by one decodes twice. The manifests are the same, byte for byte in
    every artifact, and the fused run's normalize never touched a source it could reuse."""
    import tasks.normalize
    from flows.acquire import acquire
    from flows.filter import filter_videos
    from flows.normalize import normalize
    from flows.pipeline import curate
    from infra.gtspec import PREPARED

    manifest = tmp_path / "subset.csv"
    with open(toy_dir / "captions.csv", newline="") as f:
        keep = [r for r in csv.DictReader(f)
                if r["video"] in ("clean_landscape_30fps.mp4", "reject_static.mp4")]
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(keep[0]))
        writer.writeheader()
        writer.writerows(keep)
    sources = {"sources": [{"manifest": str(manifest), "video_root": str(toy_dir / "clips")},
                           str(toy_dir / "edge")]}  # hostile inputs, uncaptioned clips
    encodes = []
    real = tasks.normalize.normalize_file
    monkeypatch.setattr(tasks.normalize, "normalize_file",
                        lambda *a, **k: encodes.append(a[0]) or real(*a, **k))

    fused_cfg = toy_config(toy_dir, f"file://{tmp_path / 'fused'}", acquire=sources)
    fused = curate(run="c", config=fused_cfg)
    fused_encodes, encodes[:] = list(encodes), []
    plain_cfg = toy_config(toy_dir, f"file://{tmp_path / 'plain'}", acquire=sources)
    plain = {}
    for name, stage in (("acquire", acquire), ("filter", filter_videos), ("normalize", normalize)):
        plain[name] = stage(run="c", config=getattr(plain_cfg, name), store=plain_cfg.store)

    volatile = {"computed_at", "flow_run"}
    stores = Store(fused_cfg.store), Store(plain_cfg.store)
    for name in STAGES:
        assert fused[name]["key"] == plain[name]["key"]
        got, want = (sorted(({k: v for k, v in r.items() if k not in volatile}
                             for r in st.read_manifest(stage_dir(name, out[name]["key"]))[0]
                             .to_pylist()), key=lambda r: r["id"])
                     for st, out in zip(stores, (fused, plain)))
        assert got == want, name
    rows = by_name(stores[0].read_manifest(
        stage_dir("normalize", fused["normalize"]["key"]))[0].to_pylist())
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) >= 6 and all(
        stores[0].exists(f"{r['video'].rsplit('/', 1)[0]}/{PREPARED}") for r in ok)
    assert not fused_encodes, fused_encodes  # every passing clip came from filter's decode
    assert len(encodes) == len(ok), encodes  # stage by stage: each one decoded again
    assert not any((tmp_path / "plain").rglob(PREPARED))

    # Each stage's progress artifact ends at 100 %, however few of its moves were published.
    from prefect import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId,
                                                ArtifactFilterType)

    runs = {r["flow_run"] for name in STAGES for r in stores[0].read_manifest(
        stage_dir(name, fused[name]["key"]))[0].to_pylist() if r.get("flow_run")}
    with get_client(sync_client=True) as client:
        bars = client.read_artifacts(artifact_filter=ArtifactFilter(
            type=ArtifactFilterType(any_=["progress"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=sorted(runs))))
    assert len(runs) == len(STAGES) and sorted(a.data for a in bars) == [100.0] * len(STAGES), \
        [(a.description, a.data) for a in bars]


def test_streamed_frames_stop_with_their_consumer_and_at_the_deadline():
    """stream_ffmpeg: frames as they are decoded; a consumer that stops early stops ffmpeg, and
    one that would wait past the timeout gets FFmpegError naming it (never a hang)."""
    import time

    from infra.video import FFMPEG, FFmpegError, stream_ffmpeg

    def realtime(seconds: int) -> list[str]:  # -re: ffmpeg paces itself at 25 frames/s
        return [FFMPEG, "-v", "error", "-nostdin", "-re", "-f", "lavfi", "-i",
                f"testsrc=size=32x24:rate=25:duration={seconds}", "-f", "rawvideo",
                "-pix_fmt", "rgb24", "pipe:"]

    t = time.monotonic()
    frames = stream_ffmpeg(realtime(60), 32, 24)
    first = [next(frames) for _ in range(3)]
    frames.close()  # the consumer is done: ffmpeg is stopped, not left running 60 s
    assert all(f.shape == (24, 32, 3) for f in first) and time.monotonic() - t < 20
    got = []
    with pytest.raises(FFmpegError, match="timed out after 1s"):
        for frame in stream_ffmpeg(realtime(60), 32, 24, timeout=1):
            got.append(frame)
    assert got and time.monotonic() - t < 40  # frames came while it ran, then the deadline
    with pytest.raises(FFmpegError, match="ffmpeg failed"):
        list(stream_ffmpeg([FFMPEG, "-v", "error", "-i", "file:/nonexistent.mp4", "-f",
                            "rawvideo", "pipe:"], 32, 24))


def test_the_fused_encode_outlives_its_frames_and_stops_with_its_block(toy_dir, tmp_path):
    """gt_pass with its own encoder (two cores): the analysis frames end with the decode and
    the GT clip is whole when the block exits, also after a block that stopped reading early;
    a block that raises stops the decode and the encoder, and leaves no ffmpeg running."""
    from infra.config import NormalizeConfig
    from infra.gtspec import NormalizeReject, gt_geometry, gt_pass, prove
    from infra.video import analysis_output, on_cores, source

    src = clip_path(toy_dir, CLEAN[0])
    info = probe(src)
    cfg = NormalizeConfig(short_edge=128, preset="ultrafast")
    geo = gt_geometry(info, cfg)

    def fused(out: Path, body):
        with on_cores(2):
            decoded = source(src).video.split()
            with gt_pass(decoded[1], geo, cfg, str(out), str(tmp_path / f"{out.stem}.png"),
                         analysis_output(decoded[0], info, 64)) as frames:
                return body(frames)

    assert fused(tmp_path / "all.mp4", lambda frames: sum(1 for _ in frames)) >= info.nb_frames - 1
    assert fused(tmp_path / "some.mp4", lambda frames: [next(frames) for _ in range(3)])
    for name in ("all", "some"):
        assert prove(str(tmp_path / f"{name}.mp4"), geo, cfg)["frames"] == cfg.frames

    def fails(frames):
        next(frames)
        raise KeyError("the analysis failed")

    with pytest.raises(KeyError, match="the analysis failed"):
        fused(tmp_path / "failed.mp4", fails)
    running = [p for p in os.listdir("/proc") if p.isdigit() and "failed.mp4" in
               Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
    assert not running
    with pytest.raises((NormalizeReject, ProbeError)):
        prove(str(tmp_path / "failed.mp4"), geo, cfg)


def test_pipe_relay_lets_the_writer_run_ahead_up_to_its_budget():
    """infra.video.PipeRelay (between the fused pass's decode and its encoder): the writer
    finishes while nobody reads, up to the budget and no further; the reader gets every byte
    in order, then the end; a reader that goes away gives the writer a broken pipe."""
    import threading

    from infra.video import PipeRelay

    def relay(budget: int):
        src_r, src_w = os.pipe()
        dst_r, dst_w = os.pipe()
        return PipeRelay(src_r, dst_w, budget), src_w, dst_r

    def write_all(fd: int, data: bytes, done: threading.Event) -> None:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        done.set()

    data = os.urandom(3 << 20)  # 3 MB: far more than two pipes hold
    r, src_w, dst_r = relay(budget=8 << 20)
    done = threading.Event()
    threading.Thread(target=write_all, args=(src_w, data, done), daemon=True).start()
    assert done.wait(10)  # the whole stream is out while nobody reads the other end
    with os.fdopen(dst_r, "rb") as f:
        assert f.read() == data  # every byte in order, then the end of the stream
    r.join()

    r, src_w, dst_r = relay(budget=1 << 20)
    done = threading.Event()
    threading.Thread(target=write_all, args=(src_w, data, done), daemon=True).start()
    assert not done.wait(1)  # past its budget (and a chunk), the relay reads no more
    assert r.held <= (1 << 20) + PipeRelay.CHUNK
    with os.fdopen(dst_r, "rb") as f:
        assert f.read() == data and done.wait(10)
    r.join()

    r, src_w, dst_r = relay(budget=1 << 20)
    os.close(dst_r)  # the encoder died
    with pytest.raises(BrokenPipeError), os.fdopen(src_w, "wb") as f:
        for _ in range(64):
            f.write(data[: 1 << 20])
            f.flush()
    r.join()


def test_buffered_reads_ahead_up_to_its_budget():
    """infra.video.buffered: nothing is yielded until the frames end or fill the budget; then
    every frame comes, in order, the rest streamed."""
    import numpy as np

    from infra.video import buffered

    pulled = []

    def frames(n: int):
        for i in range(n):
            pulled.append(i)
            yield np.full(4, i, np.uint8)

    ahead = buffered(frames(10), budget_bytes=12)  # 3 frames of 4 bytes
    assert next(ahead)[0] == 0 and len(pulled) == 3
    assert [f[0] for f in ahead] == list(range(1, 10))
    pulled.clear()
    ahead = buffered(frames(5), budget_bytes=10**6)
    assert next(ahead)[0] == 0 and len(pulled) == 5
    assert [f[0] for f in ahead] == [1, 2, 3, 4]


def test_stage_subflows_send_no_heartbeat_of_their_own(prefect_api):
    """The pipeline's stages run in its process: they send no heartbeat of their own (Prefect
    joins a heartbeat thread at a flow's end, up to a second per stage), while the pipeline's
    flow keeps its own, and nothing else of the settings changes."""
    from prefect import flow
    from prefect.settings import get_current_settings

    from flows.stage import quiet_subflows

    seen = {}

    @flow
    def stage_like():
        seen["stage"] = get_current_settings()

    @flow
    def pipeline_like():
        seen["before"] = get_current_settings()
        with quiet_subflows():
            stage_like()
        seen["after"] = get_current_settings()

    pipeline_like()
    assert seen["before"].flows.heartbeat_frequency is not None
    assert seen["stage"].flows.heartbeat_frequency is None
    assert seen["after"].flows.heartbeat_frequency == seen["before"].flows.heartbeat_frequency
    rest = {"flows"}
    assert seen["stage"].model_dump(exclude=rest) == seen["before"].model_dump(exclude=rest)
    assert seen["stage"].flows.model_dump(exclude={"heartbeat_frequency"}) == \
        seen["before"].flows.model_dump(exclude={"heartbeat_frequency"})


def test_a_run_on_the_ephemeral_api_sends_no_heartbeat(prefect_api):
    """Heartbeats are for a server that outlives the run (its zombie-run automation): against
    one (PREFECT_API_URL set) a top-level flow keeps them; on Prefect's ephemeral API, which
    stops with this process, it sends none (and does not wait up to 1 s at its end to join
    the heartbeat thread)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    from flows.stage import heartbeats_if_watched

    default = get_current_settings().flows.heartbeat_frequency
    assert PREFECT_API_URL.value() and default is not None
    with heartbeats_if_watched():
        assert get_current_settings().flows.heartbeat_frequency == default
    with temporary_settings(updates={PREFECT_API_URL: None}):
        with heartbeats_if_watched():
            assert get_current_settings().flows.heartbeat_frequency is None
        assert get_current_settings().flows.heartbeat_frequency == default
