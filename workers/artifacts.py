"""Where images go: a directory by default, any fsspec URL when shared between nodes.

Writes are atomic (temporary name, then rename) so a half-written PNG is never visible, and
idempotent (the name is the job id) so a redelivered job overwrites its own file.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from scheduler.errors import ArtifactWriteError


class ArtifactStore:
    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.root)
        if isinstance(self.fs, LocalFileSystem):
            self.base = str(Path(self.base).resolve())

    def _uri(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def path_for(self, tenant: str, job_id: str) -> str:
        return f"{self.base}/{tenant}/{job_id}.png"

    def write_png(self, image: Image.Image, tenant: str, job_id: str, metadata: dict) -> str:
        """Store ``image`` for ``tenant``; returns its URI. Raises ArtifactWriteError on any failure."""
        info = PngInfo()
        info.add_text("reprise", json.dumps(metadata, sort_keys=True, default=str))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info)
        return self._write_bytes(buffer.getvalue(), self.path_for(tenant, job_id))

    def copy_for(self, source_uri: str, tenant: str, job_id: str) -> str:
        """A tenant's own copy of a stored image (an exact hit never hands out another tenant's path)."""
        try:
            with fsspec.open(source_uri, "rb") as f:
                data = f.read()
        except (OSError, ValueError) as exc:
            raise ArtifactWriteError(f"cached image {source_uri} is unreadable: {exc}") from None
        return self._write_bytes(data, self.path_for(tenant, job_id))

    def exists(self, uri: str) -> bool:
        try:
            fs, path = fsspec.core.url_to_fs(uri)
            return fs.exists(path)
        except (OSError, ValueError):
            return False

    def _write_bytes(self, data: bytes, path: str) -> str:
        tmp = f"{path}.{uuid.uuid4().hex}.part"
        try:
            self.fs.makedirs(os.path.dirname(path), exist_ok=True)
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)
        except (OSError, ValueError) as exc:
            try:
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)
            except OSError:
                pass
            raise ArtifactWriteError(f"cannot write {path}: {exc}") from None
        return self._uri(path)
