"""The original specification's pipeline, reproduced as the baseline for bench/pipeline.py.

Three FFmpeg runs exactly as the seed writes them (transcode to MP4 with libx264's default
preset, copy the audio to M4A, then encode the video AGAIN for HLS at HLS_BITRATE with
`-g 48`), then the same whisper engine and model on the M4A. Argument lists replace the
seed's shell strings only so odd file names cannot break the baseline; the work is identical.

Usage: python -m bench.naive SOURCE WORKDIR MODEL LANGUAGE THREADS
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    source, work, model, language, threads = argv
    out = Path(work)
    hls = out / "hls"
    hls.mkdir(parents=True, exist_ok=True)
    video, audio = out / "video.mp4", out / "audio.m4a"
    quiet = ["-nostdin", "-loglevel", "error"]
    subprocess.run(["ffmpeg", *quiet, "-i", source, "-y", "-c:v", "libx264", "-c:a", "aac",
                    str(video)], check=True)  # fmt: skip
    subprocess.run(["ffmpeg", *quiet, "-i", str(video), "-y", "-vn", "-c:a", "copy", str(audio)],
                   check=True)  # fmt: skip
    subprocess.run(
        ["ffmpeg", *quiet, "-i", str(video), "-y", "-b:v", "2000k", "-g", "48", "-hls_time", "6",
         "-hls_playlist_type", "vod", "-hls_segment_filename", f"{hls}/segment%03d.ts",
         f"{hls}/playlist.m3u8"],
        check=True,
    )  # fmt: skip
    from pywhispercpp.model import Model

    whisper = Model(model, redirect_whispercpp_logs_to=None, n_threads=int(threads))
    segments = whisper.transcribe(str(audio), language=language)
    print(f"naive: {len(segments)} segments", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
