"""Config of the data stages (paper A.1): acquire, filter, normalize."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from infra.config.base import Buckets, Section

class ManifestSource(Section):
    """A CSV/Parquet manifest of videos (OpenVid-1M's CSV layout: `video`, `caption`)."""

    manifest: str = Field(description="path or URL of the CSV/Parquet file")
    video_column: str = "video"
    caption_column: str | None = "caption"
    video_root: str | None = Field(
        None, description="folder/URL prefix that relative video names are resolved against"
    )


class DownloadConfig(Section):
    """How one video is fetched. A download that breaks a limit (size, deadline) or meets a
    permanent error (4xx, a redirect off http(s), a redirect loop) is a rejected row; transient
    errors (5xx, 429, connection errors, timeouts) are retried here, then the item fails."""

    timeout_s: float = Field(60.0, gt=0, description="per-request connect/read timeout")
    deadline_s: float = Field(3600.0, gt=0, description="wall-clock limit for one download")
    max_bytes: int = Field(2_000_000_000, gt=0, description="size cap per downloaded video")
    retries: int = Field(3, ge=0, description="retries with backoff on transient errors")
    backoff_s: float = Field(
        1.0, ge=0, description="wait before retry n (0-based) is backoff_s x 2^n seconds"
    )


class AcquireConfig(Section):
    """Select raw videos by metadata (paper A.1): 16-45 fps, 5-6 s, short edge >= 512."""

    sources: list[str | ManifestSource] = Field(default_factory=list)
    extensions: list[str] = [".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"]
    fps_min: float = Field(16.0, gt=0)
    fps_max: float = Field(45.0, gt=0)
    duration_min: float = Field(5.0, ge=0, description="seconds")
    duration_max: float = Field(6.0, gt=0, description="seconds")
    short_edge_min: int = Field(512, gt=0)
    long_edge_max: int = Field(4096, gt=0, description="larger frames (8K) are rejected")
    buckets: Buckets = ["16:9", "9:16", "3:4", "1:1"]
    aspect_tolerance: float = Field(
        0.12, gt=0, description="max |log(aspect / bucket)| to count as near a bucket"
    )
    download: DownloadConfig = DownloadConfig()
    workers: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _ranges(self) -> "AcquireConfig":
        if self.fps_min > self.fps_max:
            raise ValueError(f"fps_min {self.fps_min} > fps_max {self.fps_max}")
        if self.duration_min > self.duration_max:
            raise ValueError(f"duration_min {self.duration_min} > duration_max {self.duration_max}")
        return self


class FilterSignals(Section):
    """How the one decode pass samples a video; changing these recomputes the scores."""

    short_edge: int = Field(256, ge=64, description="analysis frames are downscaled to this")
    motion_fps: float = Field(8.0, gt=0, description="frame pairs for optical flow per second")
    text_frames: int = Field(3, ge=1, description="frames sampled for OCR")
    text_side: int = Field(256, ge=32, description="OCR detector input (min side, px)")
    text_min_score: float = Field(0.6, ge=0, le=1, description="OCR confidence to count a box")
    cut_threshold: float = Field(27.0, gt=0, description="PySceneDetect ContentDetector threshold")
    still_diff: float = Field(0.6, ge=0, description="mean |diff| (0-255) below which a pair is still")


class FilterConfig(Section):
    """Quality filters (paper A.1). Thresholds only decide; scores are kept in the manifest."""

    signals: FilterSignals = FilterSignals()
    motion_min: float = Field(
        0.6, ge=0,
        description="static if the median top-2% optical-flow magnitude (px at short_edge, "
        "per 1/motion_fps s) is below this (VBench's static test, Farneback flow)",
    )
    max_cuts: int = Field(0, ge=0, description="hard cuts/transitions allowed per clip")
    flash_delta: float = Field(40.0, gt=0, description="luma jump (0-255) that counts as a flash")
    max_flashes: int = Field(0, ge=0)
    fade_fraction_max: float = Field(
        0.03, ge=0, le=1, description="max fraction of near-uniform black/white frames (fades)"
    )
    text_area_max: float = Field(
        0.04, ge=0, le=1, description="max fraction of the frame covered by detected text"
    )
    slideshow_still_min: float = Field(
        0.5, ge=0, le=1, description="slideshow if this fraction of frame pairs is still ..."
    )
    slideshow_images_min: int = Field(2, ge=2, description="... and it shows this many stills")
    min_decoded_fraction: float = Field(
        0.9, gt=0, le=1, description="truncated if fewer frames decode than this x expected"
    )
    workers: int = Field(2, ge=1)


class CaptionConfig(Section):
    """Prompt for clips without a source caption: a transformers VLM by hub id or local path."""

    model: str | None = Field(
        None,
        description="e.g. Salesforce/blip-image-captioning-large or a local folder; "
        "None rejects clips that have no source caption",
    )
    prompt: str | None = Field(None, description="text prompt for chat-style VLMs")
    max_new_tokens: int = Field(60, gt=0)
    device: str = "cpu"


class NormalizeConfig(Section):
    """GT spec (paper A.1): bucket crop, short edge 720, 16 fps, first 81 frames, H.264 yuv420p."""

    fps: float = Field(16.0, gt=0)
    frames: int = Field(81, gt=0)
    short_edge: int = Field(720, ge=16)
    buckets: Buckets = ["16:9", "9:16", "3:4", "1:1"]
    crf: int = Field(18, ge=0, le=51)
    preset: Literal[
        "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"
    ] = "medium"
    caption: CaptionConfig = CaptionConfig()
    workers: int = Field(2, ge=1)

    @field_validator("short_edge")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"short_edge {v} must be a multiple of 16 (the VAE/patch grid)")
        return v


