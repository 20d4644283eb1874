"""The pairs file format, regdpo.pairs.v1 (+ regdpo.video.v1): what precompute writes and
train reads.

One module owns the format (as nanoGPT's train.bin has one writer and one reader, neither
importing the other): the tensor names, dtypes and shapes, the header check, the writer's bytes
and the dataset reader. A pairs dataset is a committed stage output: manifest.parquet with rows
id, status, reason, latents (the store key of the row's file); _SUCCESS.json last.

Rows come in three kinds (the manifest's `kind` column; a manifest without it, every dataset
written before Dual-IPO, holds pairs only):
  pair       a regdpo.pairs.v1 file: win and lose of one prompt
  pointwise  a regdpo.video.v1 file: one video, its label in the row's `desirable` (bool);
             Diffusion-KTO trains on these directly (Dual-IPO's critic labels single videos)
  real       a regdpo.video.v1 file: one real (GT) clip, the NLL regulariser's data
The precompute stage reads them from the pairs stage's rows (`kind`, and `video` /
`desirable` for a single video, whose `pair_id` is its own id).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from infra.config.wan import TEXT_LEN
from infra.store import Store

# Per pair one safetensors file:
#
#   win, lose      [C=16, F, H, W]   VAE latents of the preferred / rejected video (normalized)
#   prompt_embeds  [512, text_dim]   UMT5 output, zero-padded to Wan's 512 text tokens
#   cond           [20, F, H, W]     I2V only: 4 first-frame mask channels, then the 16-channel
#                                    latent of the zero-padded first frame (WanImageToVideo order)
#   image_embeds   [N, image_dim]    Wan2.1 I2V only: CLIP penultimate hidden states (N = 257)
#   mask           [1, F, H, W]      optional LocalDPO region (1 = corrupted) at latent size
# Floats are float32/bfloat16/float16; the mask may also be bool/uint8.
#
# Per single video (a pointwise row or a real clip) one safetensors file, regdpo.video.v1:
#
#   latent         [C=16, F, H, W]   VAE latent of the video (normalized, as win/lose above)
#   prompt_embeds, cond, image_embeds   as for a pair (cond and CLIP from the video's frame 0)

PAIRS_FORMAT = "regdpo.pairs.v1"
VIDEO_FORMAT = "regdpo.video.v1"
ROW_KINDS = ("pair", "pointwise", "real")
PAIR_LATENTS, VIDEO_LATENTS = ("win", "lose"), ("latent",)
_FLOATS = {"F32", "F16", "BF16"}
_DTYPES = {"win": _FLOATS, "lose": _FLOATS, "latent": _FLOATS, "prompt_embeds": _FLOATS,
           "cond": _FLOATS, "image_embeds": _FLOATS, "mask": _FLOATS | {"BOOL", "U8"}}
_MAX_HEADER = 1 << 24  # a safetensors header is a few hundred bytes per tensor


class PairDataError(ValueError):
    """Pairs that do not fit the model or cannot be read; raised before any step."""


def check_pair(tensors: dict[str, tuple[str, tuple[int, ...]]], model: dict[str, Any],
               need_mask: bool, latents: tuple[str, ...] = PAIR_LATENTS) -> list[str]:
    """What is wrong with one pair's tensors (name -> (dtype, shape)) for this transformer.
    `latents=VIDEO_LATENTS` checks a single video's file (regdpo.video.v1) instead."""
    c, c_in, text_dim = model["out_channels"], model["in_channels"], model["text_dim"]
    image_dim, (pt, ph, pw) = model.get("image_dim"), model["patch_size"]
    required = {*latents, "prompt_embeds"} | ({"cond"} if c_in > c else set())
    required |= ({"image_embeds"} if image_dim else set()) | ({"mask"} if need_mask else set())
    problems = [f"missing tensor {name!r}" for name in sorted(required - tensors.keys())]
    other = set(VIDEO_LATENTS if latents == PAIR_LATENTS else PAIR_LATENTS + ("mask",))
    known = _DTYPES.keys() - other
    for name in sorted(tensors.keys() - known):
        problems.append(f"unknown tensor {name!r} (the format has {sorted(known)})")
    for name in ({"cond"} if c_in == c else set()) | (set() if image_dim else {"image_embeds"}):
        if name in tensors:
            problems.append(f"has {name!r}, which this model (in_channels={c_in}, "
                            f"image_dim={image_dim}) does not take: wrong kind?")
    for name, (dtype, _) in tensors.items():
        if name in _DTYPES and dtype not in _DTYPES[name]:
            problems.append(f"{name} has dtype {dtype}, expected one of {sorted(_DTYPES[name])}")
    if problems:
        return problems
    first = tensors[latents[0]][1]
    if len(first) != 4 or first[0] != c:
        return [f"{latents[0]} has shape {list(first)}, expected [{c}, F, H, W] ({c} latent "
                "channels)"]
    _, f, h, w = first
    if f % pt or h % ph or w % pw:
        problems.append(f"latent F×H×W = {f}×{h}×{w} is not divisible by the patch "
                        f"{pt}×{ph}×{pw}")
    expected = {**{name: (c, f, h, w) for name in latents[1:]},
                "prompt_embeds": (TEXT_LEN, text_dim), "cond": (c_in - c, f, h, w),
                "mask": (1, f, h, w)}
    if image_dim and "image_embeds" in tensors:
        expected["image_embeds"] = (tensors["image_embeds"][1][0], image_dim)
    for name, shape in expected.items():
        if name in tensors and tuple(tensors[name][1]) != shape:
            problems.append(f"{name} has shape {list(tensors[name][1])}, expected {list(shape)}")
    return problems


def row_kind(row: dict[str, Any]) -> str:
    """A manifest row's kind; rows of datasets from before the `kind` column are pairs."""
    return row.get("kind") or "pair"


@dataclass(frozen=True)
class PairsDataset:
    """The ok rows of one kind (pair by default, or pointwise / real single videos) of a
    committed pairs manifest; tensors are read one row at a time."""

    store: Store
    ids: list[str]
    keys: list[str]
    sha256: str
    kind: str = "pair"
    desirable: tuple[bool, ...] = ()
    """pointwise rows only: the row's label (True = desirable), in row order."""

    @classmethod
    def open(cls, store: Store, stage_dir: str, kind: str = "pair") -> "PairsDataset":
        found = cls.open_kinds(store, stage_dir)
        if kind not in found:
            what = "pairs" if kind == "pair" else f"{kind!r} rows"
            raise PairDataError(f"{store.uri(stage_dir)} lists no usable {what} (rows with "
                                "status 'ok' and a 'latents' URI); run the precompute stage first")
        return found[kind]

    @classmethod
    def open_kinds(cls, store: Store, stage_dir: str) -> dict[str, "PairsDataset"]:
        """kind -> its dataset, for every kind the manifest has ok rows of (one read)."""
        table, success = store.read_manifest(stage_dir)
        if "latents" not in table.column_names:
            return {}
        rows = [r for r in table.to_pylist() if r.get("status") == "ok"]
        unknown = sorted({row_kind(r) for r in rows} - set(ROW_KINDS))
        if unknown:
            raise PairDataError(f"{store.uri(stage_dir)} has rows of kind {unknown}; the format "
                                f"knows {list(ROW_KINDS)}: written by a newer regdpo?")
        found = {}
        for kind in ROW_KINDS:
            mine = [r for r in rows if row_kind(r) == kind]
            if not mine:
                continue
            if kind == "pointwise" and any(not isinstance(r.get("desirable"), bool) for r in mine):
                bad = next(r["id"] for r in mine if not isinstance(r.get("desirable"), bool))
                raise PairDataError(f"{store.uri(stage_dir)}: pointwise row {bad!r} has no "
                                    "boolean 'desirable' label; re-run the pairs stage")
            found[kind] = cls(store, [r["id"] for r in mine],
                              [store.key_of(r["latents"]) for r in mine],
                              success["manifest_sha256"], kind,
                              tuple(r["desirable"] for r in mine) if kind == "pointwise" else ())
        return found

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def latents(self) -> tuple[str, ...]:
        return PAIR_LATENTS if self.kind == "pair" else VIDEO_LATENTS

    def _where(self, i: int) -> str:
        noun = {"pair": "pair", "pointwise": "pointwise video", "real": "real clip"}[self.kind]
        return f"{noun} {self.ids[i]!r} ({self.store.uri(self.keys[i])})"

    def header(self, i: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (dtype, shape) from the file's safetensors header, without reading tensors."""
        with self.store.fs.open(self.store.path(self.keys[i]), "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= _MAX_HEADER:
                raise ValueError("not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}

    def validate(self, model: dict[str, Any], *, need_mask: bool, batch_size: int) -> None:
        """Check every pair's header against the transformer config; one error listing all."""
        problems: list[str] = []
        first: tuple[str, dict] | None = None  # (id, shapes) of the first readable pair
        for i in range(len(self)):
            try:
                tensors = self.header(i)
            except FileNotFoundError:
                problems.append(f"{self._where(i)}: latent file is missing")
                continue
            except (OSError, ValueError, KeyError, TypeError) as e:
                problems.append(f"{self._where(i)}: unreadable as safetensors ({e!r})")
                continue
            found = check_pair(tensors, model, need_mask, self.latents)
            shapes = {k: s for k, (_, s) in tensors.items()}
            if not found and batch_size > 1 and first and first[1] != shapes:
                found = [f"shapes {shapes} differ from {first[0]!r}'s {first[1]}; "
                         "batch_size > 1 stacks rows, so all must share one shape"]
            first = first or (self.ids[i], shapes)
            problems += [f"{self._where(i)}: {p}" for p in found]
        what = "pairs" if self.kind == "pair" else f"{self.kind} rows"
        if batch_size > len(self):
            problems.append(f"batch_size {batch_size} > the {len(self)} {what} of the dataset")
        if problems:
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise PairDataError(f"{len(problems)} problem(s) with the {what} for this model:\n  "
                                + "\n  ".join(problems[:10]) + more)

    def load(self, i: int) -> dict[str, Tensor]:
        try:
            data = self.store.read_bytes(self.keys[i])
        except FileNotFoundError:
            raise PairDataError(f"{self._where(i)}: latent file is missing") from None
        return {k: v.float() for k, v in load_safetensors(data).items()}


def pair_bytes(tensors: dict[str, Tensor]) -> bytes:
    """One pair's file: contiguous tensors, the format name in the safetensors metadata."""
    return save_safetensors({k: v.contiguous() for k, v in sorted(tensors.items())},
                            metadata={"format": PAIRS_FORMAT})


def video_bytes(tensors: dict[str, Tensor]) -> bytes:
    """One single video's file (a pointwise row or a real clip), regdpo.video.v1."""
    return save_safetensors({k: v.contiguous() for k, v in sorted(tensors.items())},
                            metadata={"format": VIDEO_FORMAT})
