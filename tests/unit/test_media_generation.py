"""Generated test media (devtools/media.py) are kept where a later run reuses them (the
long talks in ~/.cache): a generation that fails or is killed half-way must leave nothing
that a later run would take for the finished file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devtools import media

#: Stands in for FFmpeg: writes half a file at the output path (its last argument), then
#: fails, as FFmpeg killed by a timeout or a full disk would.
_HALF_THEN_FAIL = [
    sys.executable, "-c",
    "import sys; open(sys.argv[-1], 'wb').write(b'half'); sys.exit(1)",
]  # fmt: skip


@pytest.mark.parametrize(
    "make",
    [
        lambda d: media.make_spoken_talk(d, 60, period=20),
        lambda d: media.make_long_talk(d, 5, "64x48", "h264"),
        lambda d: media.make_media("audio_mp3", d),
    ],
    ids=["spoken_talk", "long_talk", "recipe"],
)
def test_a_failed_generation_leaves_no_file_to_reuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: object
) -> None:
    monkeypatch.setattr(media, "_FF", _HALF_THEN_FAIL)
    with pytest.raises(subprocess.CalledProcessError):
        make(tmp_path)  # type: ignore[operator]
    assert [p.name for p in tmp_path.iterdir()] == []
    monkeypatch.undo()
    made = make(tmp_path)  # type: ignore[operator]
    assert made.stat().st_size > 1000  # generated afresh, not the half file
