"""Normalize (paper A.1) to the GT spec: center-crop to the nearest allowed bucket, scale to
short edge 720, 16 fps, exactly the first 81 frames (shorter clips are rejected), H.264
yuv420p, display rotation honoured; frame 0 kept as the reference PNG; the prompt from the
source caption, else from a captioning VLM."""

from __future__ import annotations

import contextlib
import os
import tempfile

from PIL import Image

from infra.config import NormalizeConfig
from infra.gtspec import NormalizeReject, normalize_file, find_prepared
from infra.store import Store
from infra.video import probe


def normalize_one(store: Store, row: dict, cfg: NormalizeConfig, out_dir: str) -> dict:
    """Normalize one filtered clip into `out_dir` in the store; returns its manifest row."""
    base = {"id": row["id"], "source": row["source"]}
    gt_key, ref_key = f"{out_dir}/gt.mp4", f"{out_dir}/ref.png"
    if prepared := find_prepared(store, out_dir):  # encoded in filter's decode of the clip
        prompt = _prompt(store, row, cfg, lambda: store.local_copy(ref_key))
        if prompt["status"] != "ok":
            return base | prompt
        for artifact in prepared["artifacts"]:  # the row's artifacts, as if written here
            store.record(artifact["key"], artifact["size"], artifact["sha256"])
        return base | prepared["spec"] | prompt | {"video": gt_key, "ref_image": ref_key}
    with store.local_copy(store.key_of(row["video"])) as src, \
            tempfile.TemporaryDirectory(prefix="regdpo-norm-") as tmp:
        info = probe(src)
        video, ref = os.path.join(tmp, "gt.mp4"), os.path.join(tmp, "ref.png")
        try:
            spec = normalize_file(src, info, cfg, video, ref)
        except NormalizeReject as e:
            return base | {"status": "rejected", "reason": str(e)}
        prompt = _prompt(store, row, cfg, lambda: contextlib.nullcontext(ref))
        if prompt["status"] != "ok":
            return base | prompt
        # Artifacts first, the row (written by the caller) last.
        gt_uri = store.put_file(video, gt_key)
        ref_uri = store.put_file(ref, ref_key)
    return base | spec | prompt | {"video": gt_uri, "ref_image": ref_uri}


def _prompt(store: Store, row: dict, cfg: NormalizeConfig, ref_path) -> dict:
    """The clip's prompt: the source caption, else the captioning VLM's caption of frame 0
    (`ref_path()`: a context giving the PNG's local path); a rejection without either."""
    if prompt := row.get("caption") or "":
        return {"status": "ok", "reason": "", "prompt": prompt, "prompt_source": "source"}
    if not cfg.caption.model:
        return {"status": "rejected",
                "reason": "no caption in the source and normalize.caption.model is not set"}
    from models.captioner import load_captioner

    with ref_path() as ref, Image.open(ref) as image:
        prompt = load_captioner(cfg.caption).caption(image.convert("RGB"))
    return {"status": "ok", "reason": "", "prompt": prompt,
            "prompt_source": f"caption:{cfg.caption.model}"}


def normalize_item(store: Store, out_dir: str, payload: dict) -> dict:
    """The normalize stage's item: one filtered clip to the GT spec in `out_dir`."""
    return normalize_one(store, payload["row"], NormalizeConfig.model_validate(payload["config"]),
                         out_dir)
