"""Quality filter (paper A.1): static scenes, cuts/transitions, flashes and fades, excessive
on-screen text, image slideshows. One decode pass feeds every signal; every score is kept.

`analyze` computes the scores (cached per video and signal settings); `decide` applies the
thresholds, so changing a threshold re-decides without decoding anything again.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterable

import cv2
import numpy as np
from scenedetect import FrameTimecode
from scenedetect.detectors import ContentDetector

from infra.config import FilterConfig, FilterSignals, NormalizeConfig
from infra.gtspec import PREPARED, analyze_and_normalize, put_prepared
from infra.store import Store
from infra.video import FFmpegError, ProbeError, VideoInfo, probe, stream_decode

# One thread per item's analysis: the items give the parallelism (the stage's workers, a
# cluster's worker threads), as X264_THREADS does for the encode. OpenCV's pool and ONNX
# Runtime's spinning threads only burned CPU beside them: 22% of the analysis' CPU on the
# benchmark clips at the same wall time, every score identical (measured on the toy clips).
# OpenCV's setting is per process: the evaluate stage's proxy scores (items too) follow it.
cv2.setNumThreads(1)

# Rejection reasons in priority order: the first that applies becomes the row's `reason`.
REASONS = ("truncated", "static", "slideshow", "effects", "cuts", "text")


def analyze(path: str, info: VideoInfo, signals: FilterSignals) -> dict:
    """Decode once (downscaled, rotation applied) and compute every filter score."""
    return scores_of(stream_decode(path, info, signals.short_edge), info, signals)


def scores_of(frames: Iterable[np.ndarray], info: VideoInfo, signals: FilterSignals) -> dict:
    """Every filter score of the analysis frames (uint8 RGB, as ffmpeg streams them): motion and
    cuts frame by frame as they arrive, so this work overlaps the decode (and the GT encode of
    the fused pass); fades, flashes, stills and text once the video has ended."""
    fps = info.fps or 25.0
    motion, cuts = Motion(fps, signals.motion_fps), Cuts(fps, signals.cut_threshold)
    kept, gray = [], []
    for frame in frames:
        kept.append(frame)
        gray.append(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY))
        motion.add(gray[-1])
        cuts.add(frame)
    scores: dict = {
        "decoded_frames": len(kept),
        "expected_frames": max(1, int(round(info.duration * fps))),
    }
    if len(kept) < 2:
        return scores
    tiny = np.stack(gray)[:, ::2, ::2]  # luma statistics need no detail
    scores |= motion.scores() | cuts.scores()
    scores |= luma_scores(tiny, fps)
    scores |= still_scores(tiny, signals.still_diff)
    sampled = np.stack([kept[i] for i in
                        np.linspace(0, len(kept) - 1, signals.text_frames).round().astype(int)])
    scores |= text_scores(sampled, signals.text_side, signals.text_min_score)
    return scores


class Motion:
    """VBench's static test: mean of the top-2% optical-flow magnitudes of each pair of frames
    1/motion_fps s apart; the median and max over the video.

    Farneback flow runs at half the analysis size; magnitudes are reported in pixels of the
    analysis frame (short edge `signals.short_edge`) per 1/motion_fps seconds.
    """

    def __init__(self, fps: float, motion_fps: float):
        self.step = max(1, int(round(fps / motion_fps)))
        self.seen, self.last, self.mags = 0, None, []

    def add(self, gray: np.ndarray) -> None:
        i, self.seen = self.seen, self.seen + 1
        if i % self.step:
            return
        h, w = gray.shape
        small = cv2.resize(gray, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        if self.last is not None:
            flow = cv2.calcOpticalFlowFarneback(self.last, small, None, 0.5, 3, 15, 3, 5, 1.2, 0)
            mag = np.hypot(flow[..., 0], flow[..., 1]).ravel() * 2.0
            k = max(1, int(0.02 * mag.size))
            self.mags.append(float(np.partition(mag, -k)[-k:].mean()))
        self.last = small

    def scores(self) -> dict:
        if not self.mags:
            return {"motion": 0.0, "motion_max": 0.0}
        return {"motion": float(np.median(self.mags)), "motion_max": float(np.max(self.mags))}


class Cuts:
    """Hard cuts via PySceneDetect's ContentDetector, fed each frame of the one decode."""

    def __init__(self, fps: float, threshold: float):
        self.fps = float(fps)
        self.detector = ContentDetector(threshold=threshold,
                                        min_scene_len=max(2, int(self.fps * 0.25)))
        self.seen, self.cuts = 0, []

    def add(self, frame: np.ndarray) -> None:
        bgr = np.ascontiguousarray(frame[..., ::-1])
        self.cuts += self.detector.process_frame(FrameTimecode(self.seen, fps=self.fps), bgr)
        self.seen += 1

    def scores(self) -> dict:
        last = self.detector.post_process(FrameTimecode(self.seen - 1, fps=self.fps))
        return {"cuts": len(self.cuts) + len(last)}


def luma_scores(gray: np.ndarray, fps: float, black: float = 20.0, white: float = 235.0,
                flat: float = 12.0, min_spike: float = 10.0) -> dict:
    """Fades: the fraction of near-uniform black/white frames. Flashes: luma spikes that come
    back to their level within a quarter second (a hard cut changes the level and stays)."""
    flat_frames = gray.reshape(len(gray), -1)
    mean, std = flat_frames.mean(axis=1), flat_frames.std(axis=1)
    uniform = ((mean < black) | (mean > white)) & (std < flat)
    horizon = max(1, int(round(fps * 0.25)))
    spikes: list[float] = []
    i = 0
    while i < len(mean) - 1:
        jump = mean[i + 1] - mean[i]
        if abs(jump) >= min_spike:
            ahead = mean[i + 2 : i + 2 + horizon]
            back = np.nonzero(np.abs(ahead - mean[i]) < 0.3 * abs(jump))[0]
            if len(back):
                spikes.append(round(float(abs(jump)), 2))
                i += int(back[0]) + 2
                continue
        i += 1
    return {"fade_fraction": float(uniform.mean()), "flash_sizes": spikes}


def still_scores(gray: np.ndarray, still_diff: float, min_run: int = 3, distinct: float = 8.0) -> dict:
    """Slideshow signal: the fraction of still frame pairs, and how many different still
    images the still runs show (a static shot shows one; a slideshow several)."""
    g = gray.astype(np.int16)
    still = np.abs(np.diff(g, axis=0)).mean(axis=(1, 2)) < still_diff
    runs, start = [], None
    for i, s in enumerate(list(still) + [False]):
        if s and start is None:
            start = i
        elif not s and start is not None:
            if i - start >= min_run:
                runs.append((start, i))
            start = None
    images, last = 0, None
    for a, _ in runs:
        if last is None or np.abs(g[a] - last).mean() > distinct:
            images += 1
        last = g[a]
    return {"still_fraction": float(still.mean()), "still_images": images}


_OCR = None
_OCR_LOCK = threading.Lock()


def _ocr():
    """RapidOCR (PP-OCRv4 detection + recognition, ONNX); its models ship inside the wheel."""
    global _OCR
    with _OCR_LOCK:
        if _OCR is None:
            from rapidocr_onnxruntime import RapidOCR

            _OCR = RapidOCR(use_cls=False, intra_op_num_threads=1)  # see cv2.setNumThreads
        return _OCR


def text_scores(frames: np.ndarray, side: int, min_score: float) -> dict:
    """OCR text-area ratio: the fraction of the frame covered by boxes whose text was read
    with confidence >= min_score (max and mean over the sampled frames). Reading the
    text, not only detecting it, keeps flat shapes and stripes from counting as captions.
    "Excessive" text is large by definition, so the analysis resolution reads it."""
    engine = _ocr()
    ratios, words = [], []
    for frame in frames:
        bgr = np.ascontiguousarray(frame[..., ::-1])
        with _OCR_LOCK:  # the detector's input size is engine state, shared across threads
            engine.text_det.limit_side_len, engine.text_det.limit_type = side, "min"
            result, _ = engine(bgr, use_cls=False)
        mask = np.zeros(bgr.shape[:2], np.uint8)
        for box, text, score in result or []:
            if float(score) >= min_score and len(text.strip()) >= 2:
                cv2.fillPoly(mask, [np.asarray(box, np.int32)], 1)
                words.append(text.strip())
        ratios.append(float(mask.mean()))
    if not ratios:
        return {"text_area": 0.0, "text_area_mean": 0.0, "text_sample": ""}
    return {"text_area": max(ratios), "text_area_mean": float(np.mean(ratios)),
            "text_sample": " | ".join(dict.fromkeys(words))[:200]}


def decide(scores: dict, cfg: FilterConfig) -> list[str]:
    """Every rejection reason that applies, in REASONS order (an empty list: the clip passes)."""
    if scores["decoded_frames"] < cfg.min_decoded_fraction * scores["expected_frames"]:
        return ["truncated"]
    slideshow = (scores["still_fraction"] >= cfg.slideshow_still_min
                 and scores["still_images"] >= cfg.slideshow_images_min)
    flashes = sum(1 for s in scores["flash_sizes"] if s >= cfg.flash_delta)
    checks = {
        "static": scores["motion"] < cfg.motion_min and not slideshow,
        "slideshow": slideshow,
        "effects": flashes > cfg.max_flashes or scores["fade_fraction"] > cfg.fade_fraction_max,
        "cuts": scores["cuts"] > cfg.max_cuts,
        "text": scores["text_area"] > cfg.text_area_max,
    }
    return [r for r in REASONS if checks.get(r)]


def explain(reason: str, scores: dict, cfg: FilterConfig) -> str:
    """A readable reason naming the score and the threshold it crossed."""
    s = scores
    return {
        "truncated": f"truncated: decoded {s['decoded_frames']} of ~{s['expected_frames']} frames",
        "static": f"static: motion {s.get('motion', 0):.2f} < motion_min {cfg.motion_min}",
        "slideshow": f"slideshow: {s.get('still_images')} still images, "
                     f"{s.get('still_fraction', 0):.0%} still frame pairs",
        "effects": f"effects: {sum(1 for x in s.get('flash_sizes', []) if x >= cfg.flash_delta)} "
                   f"flashes, fade_fraction {s.get('fade_fraction', 0):.3f} "
                   f"(max {cfg.max_flashes} / {cfg.fade_fraction_max})",
        "cuts": f"cuts: {s.get('cuts')} > max_cuts {cfg.max_cuts}",
        "text": f"text: text_area {s.get('text_area', 0):.3f} > text_area_max {cfg.text_area_max}",
    }[reason]


def score_item(store: Store, out_dir: str, payload: dict) -> dict:
    """The filter stage's item: every score of one acquired video (thresholds decide later).
    `payload["info"]`: acquire's probe of the same bytes (content-addressed), else one here.

    With `payload["prepare"]` (the normalize item this clip becomes, when normalize runs next
    and has no output for it yet) the one decode also feeds the GT encode, which is left in
    that item's dir only if the clip passes `payload["thresholds"]` (infra.gtspec)."""
    signals = FilterSignals.model_validate(payload["signals"])
    with store.local_copy(store.key_of(payload["video"])) as path:
        try:
            info = VideoInfo(**payload["info"]) if payload.get("info") else probe(path)
            prepare = payload.get("prepare")
            # Only on the cold path: not when normalize has the clip already (or ready).
            if prepare and not any(store.exists(k) for k in
                                   (prepare["row"], f"{prepare['dir']}/{PREPARED}")):
                scores = _analyze_and_prepare(store, path, info, signals, payload["thresholds"],
                                              prepare)
            else:
                scores = analyze(path, info, signals)
        except (FFmpegError, ProbeError) as e:
            return {"status": "rejected", "reason": f"undecodable: {e}"}
    return {"status": "scored", **scores}


def _analyze_and_prepare(store: Store, path: str, info: VideoInfo, signals: FilterSignals,
                         thresholds: dict, prepare: dict) -> dict:
    """analyze(), from the decode that also encodes the GT clip; the clip is kept for the
    normalize item only when it passes. An encode that fails leaves the scores to a decode of
    their own (normalize will report the clip's problem in its own row)."""
    gt = NormalizeConfig.model_validate(prepare["config"])
    with tempfile.TemporaryDirectory(prefix="regdpo-fused-") as tmp:
        video, ref = os.path.join(tmp, "gt.mp4"), os.path.join(tmp, "ref.png")
        try:
            scores, spec = analyze_and_normalize(path, info, signals.short_edge, gt, video, ref,
                                                 lambda frames: scores_of(frames, info, signals))
        except (FFmpegError, RuntimeError):
            return analyze(path, info, signals)
        if isinstance(spec, dict) and not decide(scores, FilterConfig.model_validate(thresholds)):
            put_prepared(store, prepare["dir"], video, ref, spec)
    return scores
