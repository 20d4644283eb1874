"""Weight identities: a digest of a model folder's files, cheap enough for every key.

Names, sizes, small files whole and the first and last MiB of each large one (weight shards):
a rebuilt folder or a new hub revision gets a new identity, without reading whole weights."""

from __future__ import annotations

import hashlib
from pathlib import Path


def files_identity(root: str | Path, salt: str = "") -> str:
    root = Path(root)
    h = hashlib.sha256(salt.encode())
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        h.update(f"{path.relative_to(root)}|{size}".encode())
        with open(path, "rb") as f:
            if size <= 4 << 20:
                h.update(f.read())
            else:
                h.update(f.read(1 << 20))
                f.seek(size - (1 << 20))
                h.update(f.read())
    return h.hexdigest()[:32]
