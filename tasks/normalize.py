"""Normalize (paper A.1) to the GT spec: center-crop to the nearest allowed bucket, scale to
short edge 720, 16 fps, exactly the first 81 frames (shorter clips are rejected), H.264
yuv420p, display rotation honoured; frame 0 kept as the reference PNG; the prompt from the
source caption, else from a captioning VLM."""

from __future__ import annotations

import os
import tempfile

from PIL import Image

from infra.config import NormalizeConfig
from infra.gtspec import NormalizeReject, normalize_file
from infra.store import Store
from infra.video import probe


def normalize_one(store: Store, row: dict, cfg: NormalizeConfig, out_dir: str) -> dict:
    """Normalize one filtered clip into `out_dir` in the store; returns its manifest row."""
    base = {"id": row["id"], "source": row["source"]}
    with store.local_copy(store.key_of(row["video"])) as src, \
            tempfile.TemporaryDirectory(prefix="regdpo-norm-") as tmp:
        info = probe(src)
        video, ref = os.path.join(tmp, "gt.mp4"), os.path.join(tmp, "ref.png")
        try:
            spec = normalize_file(src, info, cfg, video, ref)
        except NormalizeReject as e:
            return base | {"status": "rejected", "reason": str(e)}
        prompt, prompt_source = row.get("caption") or "", "source"
        if not prompt:
            if not cfg.caption.model:
                return base | {"status": "rejected",
                               "reason": "no caption in the source and normalize.caption.model is not set"}
            from models.captioner import load_captioner

            with Image.open(ref) as image:
                prompt = load_captioner(cfg.caption).caption(image.convert("RGB"))
            prompt_source = f"caption:{cfg.caption.model}"
        # Artifacts first, the row (written by the caller) last.
        gt_uri = store.put_file(video, f"{out_dir}/gt.mp4")
        ref_uri = store.put_file(ref, f"{out_dir}/ref.png")
    return base | spec | {"status": "ok", "reason": "", "video": gt_uri, "ref_image": ref_uri,
                          "prompt": prompt, "prompt_source": prompt_source}


def normalize_item(store: Store, out_dir: str, payload: dict) -> dict:
    """The normalize stage's item: one filtered clip to the GT spec in `out_dir`."""
    return normalize_one(store, payload["row"], NormalizeConfig.model_validate(payload["config"]),
                         out_dir)
