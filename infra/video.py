"""Video I/O: the project's one probe function and the ffmpeg commands built on it.

ffprobe/ffmpeg always run as argument lists (never a shell string); filter graphs are built
with ffmpeg-python and compiled to argument lists.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import inspect
import json
import math
import os
import queue
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import ffmpeg
import numpy as np

if TYPE_CHECKING:
    from PIL import Image

    from infra.store import Store

FFPROBE = os.environ.get("REGDPO_FFPROBE", "ffprobe")
FFMPEG = os.environ.get("REGDPO_FFMPEG", "ffmpeg")
# x264's frame threads make its bytes depend on thread timing (measured: one clip encoded 6
# times under load gave 2 different files at threads=4). A stored clip is re-encoded when it
# is found truncated, or on another machine: it must come out byte-identical, or every key
# downstream of it moves. One encoder thread per clip; items give the parallelism.
X264_THREADS = 1

# The cores one item's ffmpeg may use where it runs, set per item by the stage template from
# the runner (flows/runner.py: a Dask worker thread is one core; the flow's threads share the
# machine's). Unset (a direct call): every core this process may run on. Threads change no
# output: decoders and scalers give the same frames on any count.
ITEM_CORES: ContextVar[int | None] = ContextVar("item_cores", default=None)


def item_cores() -> int:
    return ITEM_CORES.get() or machine_cores()


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def on_cores(cores: int | None) -> Iterator[None]:
    """The body's ffmpeg runs on `cores` cores (None: item_cores' default)."""
    budget = ITEM_CORES.set(cores)
    try:
        yield
    finally:
        ITEM_CORES.reset(budget)


def source(path: str | os.PathLike):
    """The ffmpeg-python input of a local video, decoded on the item's cores."""
    return ffmpeg.input(file_url(path), threads=item_cores())


def global_args(node, *args: str):
    """`node` compiled with quiet logging, no stdin and filters on the item's cores."""
    cores = str(item_cores())
    return (node.global_args("-v", "error", "-nostdin", "-filter_threads", cores,
                             "-filter_complex_threads", cores, *args)
            .compile(cmd=FFMPEG))


class ProbeError(ValueError):
    """The file is not a usable video; the message is the rejection reason."""


class FFmpegError(RuntimeError):
    """ffmpeg failed; the message carries the tail of its stderr."""


@dataclass(frozen=True)
class VideoInfo:
    width: int  # coded size
    height: int
    rotation: int  # display rotation in degrees (0, 90, 180, 270)
    display_width: int  # size as shown, rotation applied
    display_height: int
    fps: float  # average frame rate
    r_fps: float  # container's base frame rate
    vfr: bool
    duration: float
    nb_frames: int | None
    pix_fmt: str
    bit_depth: int
    codec: str
    has_audio: bool
    size_bytes: int

    @property
    def short_edge(self) -> int:
        return min(self.display_width, self.display_height)

    @property
    def long_edge(self) -> int:
        return max(self.display_width, self.display_height)

    @property
    def aspect(self) -> float:
        return self.display_width / self.display_height

    def as_row(self) -> dict:
        return asdict(self)


def _rate(text: str | None) -> float:
    try:
        f = Fraction(text or "0/1")
    except (ValueError, ZeroDivisionError):
        return 0.0
    return float(f) if f.denominator else 0.0


def _rotation(stream: dict) -> int:
    rot = 0.0
    for side in stream.get("side_data_list") or []:
        if "rotation" in side:
            rot = float(side["rotation"])
    if not rot and "rotate" in (stream.get("tags") or {}):
        rot = float(stream["tags"]["rotate"])
    return int(round(rot)) % 360


def _bit_depth(stream: dict) -> int:
    raw = stream.get("bits_per_raw_sample")
    if raw and str(raw).isdigit():
        return int(raw)
    pix = stream.get("pix_fmt") or ""
    for depth in (16, 14, 12, 10, 9):
        if f"p{depth}" in pix:
            return depth
    return 8


def probe(path: str | os.PathLike, count_frames: bool = False, timeout: float = 60.0) -> VideoInfo:
    """Probe a local video file. Raises ProbeError with a readable reason for bad input."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ProbeError(f"cannot read file: {e.strerror}") from None
    if size == 0:
        raise ProbeError("empty file (0 bytes)")
    cmd = [FFPROBE, "-v", "error", "-print_format", "json", "-show_format", "-show_streams"]
    if count_frames:
        cmd += ["-count_packets"]
    cmd.append(file_url(path))
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ProbeError(f"ffprobe timed out after {timeout:.0f}s") from None
    if out.returncode != 0:
        msg = (_last_line(out.stderr) or "unknown error").replace(file_url(path) + ": ", "")
        # ffprobe prints this before its last line; it also says so for any non-MP4 named .mp4.
        if b"moov atom not found" in out.stderr and _starts_like_mp4(path):
            raise ProbeError("truncated or incomplete MP4 (moov atom not found)")
        raise ProbeError(f"not a readable video (ffprobe: {msg})")
    info = json.loads(out.stdout or b"{}")
    streams = info.get("streams") or []
    video = [s for s in streams if s.get("codec_type") == "video"
             and not (s.get("disposition") or {}).get("attached_pic")]
    if not video:
        kinds = sorted({s.get("codec_type", "?") for s in streams}) or ["none"]
        raise ProbeError(f"no video stream (streams: {', '.join(kinds)})")
    v = video[0]
    width, height = int(v.get("width") or 0), int(v.get("height") or 0)
    if width <= 0 or height <= 0:
        raise ProbeError("video stream has no frame size")
    rotation = _rotation(v)
    dw, dh = (height, width) if rotation in (90, 270) else (width, height)
    fps, r_fps = _rate(v.get("avg_frame_rate")), _rate(v.get("r_frame_rate"))
    fps = fps or r_fps
    duration = float(v.get("duration") or (info.get("format") or {}).get("duration") or 0.0)
    nb = v.get("nb_read_packets") if count_frames else v.get("nb_frames")
    nb_frames = int(nb) if nb and str(nb).isdigit() else None
    if not fps and nb_frames and duration:
        fps = nb_frames / duration
    vfr = bool(fps and r_fps and abs(fps - r_fps) / r_fps > 0.02)
    return VideoInfo(
        width=width, height=height, rotation=rotation, display_width=dw, display_height=dh,
        fps=round(fps, 4), r_fps=round(r_fps, 4), vfr=vfr, duration=round(duration, 4),
        nb_frames=nb_frames, pix_fmt=v.get("pix_fmt") or "", bit_depth=_bit_depth(v),
        codec=v.get("codec_name") or "", has_audio=any(s.get("codec_type") == "audio" for s in streams),
        size_bytes=size,
    )


def _starts_like_mp4(path: str) -> bool:
    """An ISO-BMFF file opens with an `ftyp` box: a cut-off MP4 still does, a text file does not."""
    with open(path, "rb") as f:
        return f.read(12)[4:8] == b"ftyp"


def file_url(path: str | os.PathLike) -> str:
    """`file:/abs/path`: ffmpeg never reads a data-derived name as an option or a protocol."""
    return "file:" + os.path.abspath(os.fspath(path))


def _last_line(stderr: bytes) -> str:
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1][-300:] if lines else ""


def run_ffmpeg(args: list[str], timeout: float = 600.0,
               input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a compiled ffmpeg argument list (`input` piped to its stdin); raise FFmpegError with
    stderr's tail on failure."""
    try:
        out = subprocess.run(args, input=input, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise FFmpegError(f"ffmpeg timed out after {timeout:.0f}s") from None
    if out.returncode != 0:
        raise FFmpegError(f"ffmpeg failed: {_last_line(out.stderr) or out.returncode}")
    return out


def even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def scaled_size(width: int, height: int, short_edge: int) -> tuple[int, int]:
    """(w, h) with the short edge scaled to `short_edge`, both even."""
    s = short_edge / min(width, height)
    return even(width * s), even(height * s)


def decode_frames(path: str, info: VideoInfo, short_edge: int, timeout: float = 600.0) -> np.ndarray:
    """Decode the video once (rotation applied), every frame downscaled to `short_edge`:
    uint8 RGB [N, H, W, 3]."""
    out, w, h = analysis_output(source(path).video, info, short_edge)
    return frames_of(run_ffmpeg(global_args(out), timeout=timeout).stdout, w, h)


def stream_decode(path: str, info: VideoInfo, short_edge: int,
                  timeout: float = 600.0) -> Iterator[np.ndarray]:
    """decode_frames' frames one by one as ffmpeg decodes them (the consumer's work overlaps
    the decode)."""
    out, w, h = analysis_output(source(path).video, info, short_edge)
    yield from stream_ffmpeg(global_args(out), w, h, timeout)


def stream_ffmpeg(args: list[str], w: int, h: int, timeout: float = 600.0,
                  handed: int | None = None) -> Iterator[np.ndarray]:
    """Run a compiled ffmpeg argument list whose stdout is rgb24 frames of w x h, yielding each
    frame (uint8 [h, w, 3]) as it arrives (w = h = 0: no frames, stdout unused). A reader thread
    drains the pipe, so ffmpeg never waits for the consumer; a trailing partial frame is dropped
    (as decode_frames does). Once the frames are out, raises FFmpegError with stderr's tail if
    ffmpeg failed or ran past `timeout`; a consumer that stops early stops ffmpeg. `handed`: a
    pipe's write end that ffmpeg writes to (an output `pipe:<fd>`), closed here once ffmpeg
    holds it, so the reader sees the end of the stream when ffmpeg closes it."""
    size, chunks = w * h * 3, queue.SimpleQueue()
    err = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE if size else subprocess.DEVNULL,
                                stderr=err, pass_fds=() if handed is None else (handed,))
    except BaseException:
        err.close()
        raise
    finally:
        if handed is not None:
            os.close(handed)
    with err, proc:
        fired = threading.Event()

        def kill() -> None:
            fired.set()
            proc.kill()

        watchdog = threading.Timer(timeout, kill)

        def drain() -> None:
            try:
                while len(chunk := proc.stdout.read(size)) == size:
                    chunks.put(chunk)
            finally:
                chunks.put(None)

        watchdog.start()
        if size:
            threading.Thread(target=drain, name="ffmpeg-frames", daemon=True).start()
        else:
            chunks.put(None)
        try:
            while (chunk := chunks.get()) is not None:
                yield np.frombuffer(chunk, np.uint8).reshape(h, w, 3)
            code = proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
        if fired.is_set():
            raise FFmpegError(f"ffmpeg timed out after {timeout:.0f}s")
        if code != 0:
            err.seek(0)
            raise FFmpegError(f"ffmpeg failed: {_last_line(err.read()) or code}")


@contextlib.contextmanager
def stream_encoding(args_for: Callable[[str], list[str]], encoder: list[str], w: int, h: int,
                    timeout: float = 600.0) -> Iterator[Iterator[np.ndarray]]:
    """stream_ffmpeg of `args_for(target)`, an ffmpeg whose graph also writes frames to
    `target`, a pipe to `encoder`: a second ffmpeg that reads them on stdin and encodes them.
    Two processes, so the encoder (one x264 thread, X264_THREADS) runs beside the decode and
    the filters instead of after them on ffmpeg's one filter-and-encode thread.

    Between the two, a relay (PipeRelay) holds up to ENCODE_AHEAD of the encoder's input in
    memory, so the decode runs at its own pace instead of x264's (a pipe holds less than one
    frame): the frames end when the decode does, well before the encode, and work on them
    overlaps the encode. The encoder is waited for when the block exits. Raises FFmpegError
    if either fails; a block that stops early or raises stops both."""
    read, write = os.pipe()  # decoder -> relay
    enc_read, enc_write = os.pipe()  # relay -> encoder
    for fd in (read, enc_read):
        widen_pipe(fd)
    with tempfile.TemporaryFile() as err:
        try:
            args = args_for(f"pipe:{write}")
            enc = subprocess.Popen(encoder, stdin=enc_read, stdout=subprocess.DEVNULL, stderr=err)
        except BaseException:
            for fd in (write, read, enc_write):
                os.close(fd)
            raise
        finally:
            os.close(enc_read)
        relay = PipeRelay(read, enc_write, ENCODE_AHEAD)
        with enc:
            frames = stream_ffmpeg(args, w, h, timeout, handed=write)
            try:
                yield frames
                for _ in frames:  # a block that did not read them all: the decode runs out
                    pass
            except BaseException:
                if inspect.getgeneratorstate(frames) == inspect.GEN_CREATED:
                    os.close(write)  # the decode never started: the relay's input ends here
                frames.close()
                enc.kill()
                relay.join()
                raise
            try:
                code = enc.wait(timeout)
            except subprocess.TimeoutExpired:
                enc.kill()
                raise FFmpegError(f"ffmpeg (encoder) timed out after {timeout:.0f}s") from None
            finally:
                relay.join()
            if code != 0:
                err.seek(0)
                raise FFmpegError(f"ffmpeg (encoder) failed: {_last_line(err.read()) or code}")


# Linux's ceiling for an unprivileged pipe's buffer (/proc/sys/fs/pipe-max-size's default).
PIPE_BYTES = 1 << 20


def widen_pipe(fd: int) -> None:
    """Give the pipe of `fd` (either end) PIPE_BYTES of buffer where the OS allows it, else
    leave it as it is. The relay then moves 1 MB a call instead of the default 64 KB
    (measured: 112 MB through PipeRelay took 0.20 CPU s instead of 0.25-0.28)."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or over the user's quota
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


# How far the decode may run ahead of the GT encoder (stream_encoding): the whole GT clip at
# the default spec (81 frames of 1280x720 yuv420p are 112 MB), so the decode never waits.
ENCODE_AHEAD = 256 * 2**20


class PipeRelay:
    """Copies pipe `src` to pipe `dst` through memory, up to `budget` bytes ahead of dst's
    reader, in two threads (one reads, one writes). Owns both fds: dst is closed at src's end
    (its reader sees the end of the stream), src when dst's reader goes away (its writer sees
    a broken pipe, as it would writing to that reader directly)."""

    CHUNK = PIPE_BYTES

    def __init__(self, src: int, dst: int, budget: int):
        self.src, self.dst, self.budget = src, dst, budget
        self.chunks: collections.deque[bytes] = collections.deque()
        self.held, self.ended, self.broken = 0, False, False
        self.cond = threading.Condition()
        self.threads = [threading.Thread(target=f, name=f"pipe-relay-{f.__name__}", daemon=True)
                        for f in (self._read, self._write)]
        for t in self.threads:
            t.start()

    def _read(self) -> None:
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.held < self.budget or self.broken)
                    if self.broken:
                        return
                data = os.read(self.src, self.CHUNK)
                with self.cond:
                    if self.broken:
                        return
                    if data:
                        self.chunks.append(data)
                        self.held += len(data)
                    else:
                        self.ended = True
                    self.cond.notify_all()
                if not data:
                    return
        finally:
            os.close(self.src)
            with self.cond:
                self.ended = True
                self.cond.notify_all()

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.chunks or self.ended)
                    if not self.chunks:
                        return
                    data = self.chunks.popleft()
                view = memoryview(data)
                while view:
                    view = view[os.write(self.dst, view):]
                with self.cond:
                    self.held -= len(data)
                    self.cond.notify_all()
        except OSError:  # the reader went away: so does the writer's reader
            with self.cond:
                self.broken = True
                self.chunks.clear()
                self.cond.notify_all()
        finally:
            os.close(self.dst)

    def join(self) -> None:
        for t in self.threads:
            t.join()


def buffered(frames: Iterator[np.ndarray], budget_bytes: int) -> Iterator[np.ndarray]:
    """`frames`, read ahead into memory until they end or hold `budget_bytes`, then yielded
    (and any rest streamed): the consumer's work starts once the producer is done (or
    `budget_bytes` ahead), instead of taking the CPU it needs."""
    ahead, size = [], 0
    for frame in frames:
        ahead.append(frame)
        size += frame.nbytes
        if size >= budget_bytes:
            break
    ahead.reverse()
    while ahead:
        yield ahead.pop()
    yield from frames


def analysis_output(stream, info: VideoInfo, short_edge: int):
    """(the output node, w, h): every decoded frame, downscaled to `short_edge`, as rgb24 on
    stdout. One builder for decode_frames and the fused curation pass (infra.gtspec), so both
    give the same frames: the decoder runs at full quality (the GT encode may share it).
    zimg resizes in the source's own format where it is one of RESIZE_FORMATS (else swscale
    converts it to the nearest first); the RGB conversion comes after, at the analysis size."""
    w, h = scaled_size(info.display_width, info.display_height, short_edge)
    out = (stream.filter("format", "|".join(RESIZE_FORMATS))
           .filter(RESIZE, w=w, h=h, filter="bilinear")
           .output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough"))
    return out, w, h


# The resize filter of the analysis frames and the GT clip: zscale (zimg), not swscale's
# scale. Measured on a 1080p30 benchmark clip, the fused pass's decoder (both resizes) took 1.18
# instead of 1.73 CPU s, 0.82 instead of 1.14 s wall, and the GT encode waits on that decoder
# for its first 40 frames (x264's lookahead). ffmpeg needs libzimg (Debian's package has
# it); flows.preflight says so before a run when it is missing.
RESIZE = "zscale"
# The formats RESIZE takes as they are: planar, chroma subsampled at most 2x (zimg refuses an
# even output size in 4:1:1 or 4:1:0, e.g. DV's yuv411p).
RESIZE_FORMATS = ("yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p",
                  "yuv420p10le", "yuv422p10le", "yuv444p10le", "gbrp", "gray")


@functools.cache
def ffmpeg_problem() -> str | None:
    """Why FFMPEG cannot run the video stages (not found, or no RESIZE filter), else None."""
    try:
        out = subprocess.run([FFMPEG, "-hide_banner", "-filters"], capture_output=True,
                             text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return (f"ffmpeg ({FFMPEG!r}) does not run ({e}): install it (apt-get install ffmpeg) "
                "or point REGDPO_FFMPEG at one")
    if not any(line.split()[1:2] == [RESIZE] for line in out.stdout.splitlines()):
        return (f"ffmpeg ({FFMPEG!r}) has no {RESIZE} filter (it is built without libzimg): "
                "install a build with it (Debian's ffmpeg package has it) "
                "or point REGDPO_FFMPEG at one")
    return None


def frames_of(buf: bytes, w: int, h: int) -> np.ndarray:
    n = len(buf) // (w * h * 3)
    return np.frombuffer(buf[: n * w * h * 3], np.uint8).reshape(n, h, w, 3)


@dataclass(frozen=True)
class Geometry:
    """Center crop on the displayed frame, then scale to the bucket's exact output size."""

    bucket: str
    crop_w: int
    crop_h: int
    crop_x: int
    crop_y: int
    out_w: int
    out_h: int


def nearest_bucket(aspect: float, buckets: list[str]) -> tuple[str, float]:
    """The allowed bucket closest in log-aspect, and that distance |log(aspect / bucket)|."""
    best = min(buckets, key=lambda b: abs(math.log(aspect / _ratio(b))))
    return best, abs(math.log(aspect / _ratio(best)))


def _ratio(bucket: str) -> float:
    w, h = bucket.split(":")
    return int(w) / int(h)


def bucket_geometry(width: int, height: int, buckets: list[str], short_edge: int) -> Geometry:
    bucket = nearest_bucket(width / height, buckets)[0]
    bw, bh = (int(x) for x in bucket.split(":"))
    a = bw / bh
    if width / height > a:  # too wide: crop width
        cw, ch = min(width, even(height * a)), height
    else:
        cw, ch = width, min(height, even(width / a))
    cw, ch = cw - cw % 2, ch - ch % 2
    # Output: short edge exactly `short_edge`, long edge on the 16-pixel grid of the VAE/patches.
    if bw >= bh:
        out_h, out_w = short_edge, int(round(short_edge * a / 16)) * 16
    else:
        out_w, out_h = short_edge, int(round(short_edge / a / 16)) * 16
    return Geometry(bucket, cw, ch, (width - cw) // 2, (height - ch) // 2, out_w, out_h)


def gt_outputs(stream, dst_video: str, dst_ref: str, geo: Geometry, fps: float, frames: int,
               crf: int, preset: str, encoder_pipe: str | None = None) -> list:
    """The GT clip's output nodes from a decoded video stream: fps -> center crop -> scale ->
    yuv420p H.264 (first `frames`) and the frame-0 PNG. With `encoder_pipe`, the frames go
    there for gt_encoder, an ffmpeg of their own (raw video in Matroska, which carries their
    size, rate, SAR and colour properties: the same bytes come out). One builder for normalize
    and the fused curation pass (infra.gtspec), so a clip's bytes do not depend on which pass
    made it.

    ffmpeg's default autorotate applies the display rotation before the filters, so the
    geometry is computed on display size and the output carries no rotation flag. The
    conversion to yuv420p (swscale: bit depth, chroma, range) comes before the resize (zimg,
    RESIZE), which then only resizes.
    """
    v = (
        stream.filter("fps", fps=fps)
        .filter("crop", geo.crop_w, geo.crop_h, geo.crop_x, geo.crop_y)
        .filter("format", "yuv420p")
        .filter(RESIZE, w=geo.out_w, h=geo.out_h, filter="lanczos")
        .filter("setsar", 1)
        .filter("format", "yuv420p")
        .split()
    )
    if encoder_pipe:
        video = v[0].output(encoder_pipe, format="matroska", vcodec="rawvideo",
                            **{"frames:v": frames})
    else:
        video = v[0].output(file_url(dst_video), **_gt_codec(frames, crf, preset))
    ref = v[1].output(file_url(dst_ref), **{"frames:v": 1, "update": 1})
    return [video, ref]


def gt_encoder(dst_video: str, frames: int, crf: int, preset: str) -> list[str]:
    """The GT clip's encode as an ffmpeg of its own, reading gt_outputs' frames on stdin."""
    return (ffmpeg.input("pipe:", format="matroska").video
            .output(file_url(dst_video), **_gt_codec(frames, crf, preset))
            .global_args("-v", "error", "-nostdin", "-y")
            .compile(cmd=FFMPEG))


def _gt_codec(frames: int, crf: int, preset: str) -> dict:
    """yuv420p H.264 of the first `frames`, no metadata, moov first."""
    return {"vcodec": "libx264", "crf": crf, "preset": preset, "pix_fmt": "yuv420p",
            "movflags": "+faststart", "map_metadata": -1, "threads": X264_THREADS,
            "frames:v": frames, "profile:v": "high"}


def read_frames(path: str, info: VideoInfo, bucket: str, width: int, height: int, fps: float,
                frames: int) -> np.ndarray:
    """uint8 [frames, height, width, 3]: the first `frames` at `fps`, center-cropped to `bucket`
    and scaled, as normalize does (a no-op crop and scale for clips already at the size)."""
    geo = bucket_geometry(info.display_width, info.display_height, [bucket], min(width, height))
    args = (
        ffmpeg.input(file_url(path)).video
        .filter("fps", fps=fps)
        .filter("crop", geo.crop_w, geo.crop_h, geo.crop_x, geo.crop_y)
        .filter("scale", width, height, flags="lanczos")
        .output("pipe:", format="rawvideo", pix_fmt="rgb24", **{"frames:v": frames})
        .global_args("-v", "error", "-nostdin")
        .compile(cmd=FFMPEG)
    )
    buf = run_ffmpeg(args).stdout
    got = len(buf) // (width * height * 3)
    if got < frames:
        raise ValueError(f"video has {got} frames at {fps:g} fps, need {frames}")
    return np.frombuffer(buf, np.uint8)[: frames * height * width * 3].copy() \
        .reshape(frames, height, width, 3)


def write_video(frames: np.ndarray, rate: Fraction, path: str, pix_fmt: str,
                codec: list[str]) -> None:
    """Encode raw frames [F, H, W(, 3)] piped to ffmpeg (an argument list, never a shell)."""
    height, width = frames.shape[1:3]
    args = [FFMPEG, "-v", "error", "-nostdin", "-y", "-f", "rawvideo", "-pix_fmt", pix_fmt,
            "-s", f"{width}x{height}", "-r", f"{rate.numerator}/{rate.denominator}",
            "-i", "pipe:", *codec, file_url(path)]
    run_ffmpeg(args, input=np.ascontiguousarray(frames).tobytes())


def reference_image(store: "Store", ref: str) -> "Image.Image":
    """A stored reference frame (PNG), named by key or store URI, as an RGB image."""
    from PIL import Image

    with store.local_copy(store.key_of(ref)) as local, Image.open(local) as image:
        return image.convert("RGB")
