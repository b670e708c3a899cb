"""Every value that becomes a path is validated here, and only here.

Data from the database (category ids, source paths) ends up in WebDAV URLs; a value like
`../../etc` or one with control characters must be rejected with a clear message before any
request is made. Local scratch file names are never derived from data at all.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import dataclass
from urllib.parse import quote

from jobrunner.errors import PermanentError

_CATEGORY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_EXTENSION = re.compile(r"^[A-Za-z0-9]{1,10}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def validate_category(category_id: str) -> str:
    """A category id is one safe path segment (letters, digits, `_ . -`, not starting with
    a dot or dash)."""
    if not _CATEGORY.fullmatch(category_id) or category_id in {".", ".."}:
        raise PermanentError(
            f"media category_id {category_id!r} is not a safe path segment "
            "(allowed: letters, digits, '_', '.', '-', at most 64, not starting with '.' or '-')"
        )
    return category_id


def dav_segments(path: str, what: str = "path") -> list[str]:
    """Split a WebDAV path into validated segments: no `.`/`..`, no empty segments, no
    backslashes or control characters. Leading/trailing slashes are ignored."""
    if _CONTROL.search(path) or "\\" in path:
        raise PermanentError(f"{what} {path!r} contains control characters or backslashes")
    segments = [s for s in path.strip("/").split("/")]
    if not path.strip("/") or any(s in {"", ".", ".."} for s in segments):
        raise PermanentError(f"{what} {path!r} is not a clean path (empty, '.' or '..' segment)")
    return segments


def url_path(segments: list[str]) -> str:
    """Percent-encode each segment so spaces, quotes, `#`, `?` and unicode travel intact."""
    return "/" + "/".join(quote(s, safe="") for s in segments)


def source_extension(source_path: str) -> str:
    """The source's extension if it is a plain one (FFmpeg only uses it as a hint)."""
    name = source_path.rstrip("/").rsplit("/", 1)[-1]
    if "." in name:
        ext = name.rsplit(".", 1)[1]
        if _EXTENSION.fullmatch(ext):
            return "." + ext.lower()
    return ""


@dataclass(frozen=True)
class ArtifactLayout:
    """The contract paths: `/{category_id}/{yymm}/{media_id}/...` (yymm from created_at, UTC)."""

    category_id: str
    yymm: str
    media_id: uuid.UUID

    @classmethod
    def for_media(
        cls, category_id: str, created_at: dt.datetime, media_id: uuid.UUID
    ) -> ArtifactLayout:
        if created_at.tzinfo is None:
            created_at = created_at.replace(tzinfo=dt.timezone.utc)
        yymm = created_at.astimezone(dt.timezone.utc).strftime("%y%m")
        return cls(validate_category(category_id), yymm, media_id)

    @property
    def base(self) -> list[str]:
        return [self.category_id, self.yymm, str(self.media_id)]

    def file(self, *names: str) -> list[str]:
        return [*self.base, *names]

    def collections(self) -> list[list[str]]:
        """Every collection that must exist, parents first."""
        base = self.base
        return [base[:1], base[:2], base, [*base, "hls"]]
