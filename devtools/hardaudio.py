"""The hard-audio corpus (issue 12, item 2): what real talks contain besides clean speech —
music, noise, bells, chanting, synthetic voices, long pauses with a few words, speech over
music — generated here with FFmpeg's `lavfi` sources and Debian's `espeak-ng`, never checked
in. Each case is a 16 kHz mono WAV of 15-30 s, so the benchmark (`bench/hardaudio.py`) and
the test (`tests/integration/test_hard_audio.py`) take minutes, not hours.

Why these: whisper.cpp's time on a window grows when its decode fails its quality checks
(temperature fallback re-decodes the window, up to five more times with five candidates
each), and that happens on audio that is not clear speech in the job's language. Each case
is one way a dharma talk is not clear speech. `clean_speech` (the public-domain `jfk.wav`,
twice) is the reference every case's real-time factor is compared with.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devtools.media import JFK, espeak

_FF = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
_OUT = ["-ar", "16000", "-ac", "1", "-c:a", "pcm_s16le"]

#: A slow I-IV-V-I progression, one chord a second, three sines each: "music" with pitch,
#: rhythm and harmony, which is what whisper mistakes for singing or speech.
_CHORDS = (
    "0.12*(sin(2*PI*t*220*pow(2,st(0,if(lt(mod(t,4),1),0,if(lt(mod(t,4),2),5,"
    "if(lt(mod(t,4),3),7,0))))/12))"
    "+sin(2*PI*t*277.2*pow(2,ld(0)/12))+sin(2*PI*t*329.6*pow(2,ld(0)/12)))"
    "*(0.6+0.4*exp(-3*mod(t,1)))"
)
#: A temple bell struck every 5 s: inharmonic partials decaying over seconds.
_BELL = (
    "0.5*exp(-0.9*mod(t,5))*(sin(2*PI*523*t)+0.6*sin(2*PI*1247*t)"
    "+0.4*sin(2*PI*1871*t)+0.25*sin(2*PI*2741*t))/2.25"
)
#: A low drone under chanting: 110 Hz and its octave and fifth.
_DRONE = "0.06*(sin(2*PI*110*t)+0.7*sin(2*PI*220*t)+0.5*sin(2*PI*165*t))"

_ENGLISH = (
    "Please sit comfortably and close your eyes.",
    "Notice the breath as it comes in and as it goes out.",
    "When the mind wanders, gently bring it back.",
    "There is nothing to achieve and nowhere to go.",
    "Let the body rest, and let the breath be as it is.",
)
_MANDARIN = (
    "今天我们学习佛经。",
    "这个问题很重要，请大家认真听讲。",
    "学习佛法需要耐心和恒心。",
)
_CHANT = ("南无阿弥陀佛", "南无阿弥陀佛", "南无阿弥陀佛", "南无阿弥陀佛")


@dataclass(frozen=True)
class Case:
    """One hard-audio case: `make(directory)` writes its WAV and returns the path."""

    name: str
    #: The job language the case is transcribed with (the deployment default is zh).
    language: str
    what: str
    make: Callable[[Path], Path]


def _run(args: list[str]) -> None:
    subprocess.run([*_FF, *args], check=True, capture_output=True)


def _lavfi(path: Path, source: str, seconds: float) -> Path:
    _run(["-f", "lavfi", "-i", source, "-t", f"{seconds:g}", *_OUT, str(path)])
    return path


def _over(path: Path, speech: Path, bed: str, seconds: float, delay_ms: int = 0) -> Path:
    """`speech` (delayed by `delay_ms`) mixed over the `lavfi` source `bed`, `seconds` long."""
    chain = (
        f"[0:a]adelay={delay_ms}:all=1,apad[s];[1:a]aresample=16000[b];"
        f"[s][b]amix=inputs=2:duration=shortest:normalize=0[out]"
    )
    _run(["-i", str(speech), "-f", "lavfi", "-i", bed, "-filter_complex", chain,
          "-map", "[out]", "-t", f"{seconds:g}", *_OUT, str(path)])  # fmt: skip
    return path


def _clean(path: Path) -> Path:
    """jfk.wav twice with a 1.5 s pause: 25 s of clear English speech."""
    _run(["-i", str(JFK), "-i", str(JFK), "-filter_complex",
          "[0:a]apad=pad_dur=1.5[a];[a][1:a]concat=n=2:v=0:a=1[out]", "-map", "[out]",
          *_OUT, str(path)])  # fmt: skip
    return path


def _sparse(path: Path) -> Path:
    """28 s of hall room tone (brown noise at about -50 dBFS, above the runner's -60 dBFS
    silence gate, so whisper is given all of it) with two short Mandarin phrases."""
    words = espeak(path.with_name(f"{path.stem}-words.wav"), "cmn-latn-pinyin",
                    ("请大家坐好。", "现在开始静坐。"))  # fmt: skip
    chain = (
        "[0:a]asplit[w1][w2];[w1]atrim=0:1.6,adelay=3000:all=1[x];"
        "[w2]atrim=start=1.6,asetpts=PTS-STARTPTS,adelay=19000:all=1[y];"
        "[1:a]aresample=16000[b];[x][y][b]amix=inputs=3:duration=longest:normalize=0[out]"
    )
    _run(["-i", str(words), "-f", "lavfi", "-i",
          "anoisesrc=color=brown:amplitude=0.01:sample_rate=16000:duration=28",
          "-filter_complex", chain, "-map", "[out]", "-t", "28", *_OUT, str(path)])  # fmt: skip
    words.unlink()
    return path


def _speech_over_music(path: Path) -> Path:
    speech = espeak(path.with_name(f"{path.stem}-speech.wav"), "en-us", _ENGLISH)
    _over(path, speech, f"aevalsrc='{_CHORDS}':s=16000", 20, delay_ms=1000)
    speech.unlink()
    return path


def _chant(path: Path) -> Path:
    voice = espeak(path.with_name(f"{path.stem}-voice.wav"), "cmn-latn-pinyin", _CHANT, 80)
    _over(path, voice, f"aevalsrc='{_DRONE}':s=16000", 20, delay_ms=500)
    voice.unlink()
    return path


def _tone(expression: str) -> str:
    return f"aevalsrc='{expression}':s=16000"


CASES: tuple[Case, ...] = (
    Case("clean_speech", "en", "jfk.wav twice (the reference)", _clean),
    Case("chords", "zh", "music: I-IV-V-I chords of sines",
         lambda p: _lavfi(p, _tone(_CHORDS), 20)),
    Case("pink_noise", "zh", "pink noise (anoisesrc)",
         lambda p: _lavfi(p, "anoisesrc=color=pink:amplitude=0.3:sample_rate=16000", 20)),
    Case("brown_noise", "zh", "brown noise (anoisesrc)",
         lambda p: _lavfi(p, "anoisesrc=color=brown:amplitude=0.5:sample_rate=16000", 20)),
    Case("bells", "zh", "a bell every 5 s (decaying sines)", lambda p: _lavfi(p, _tone(_BELL), 25)),
    Case("espeak_en", "en", "espeak-ng en-us", lambda p: espeak(p, "en-us", _ENGLISH)),
    Case("espeak_en_as_zh", "zh", "espeak-ng en-us in a zh job",
         lambda p: espeak(p, "en-us", _ENGLISH)),
    Case("espeak_cmn", "zh", "espeak-ng cmn (pinyin read as English)",
         lambda p: espeak(p, "cmn", _MANDARIN)),
    Case("espeak_cmn_pinyin", "zh", "espeak-ng cmn-latn-pinyin",
         lambda p: espeak(p, "cmn-latn-pinyin", _MANDARIN)),
    Case("chant_over_drone", "zh", "slow repeated chant over a drone", _chant),
    Case("sparse_words", "zh", "28 s of room tone, two short phrases", _sparse),
    Case("speech_over_music", "en", "espeak-ng en-us over the chords", _speech_over_music),
)  # fmt: skip
BY_NAME = {case.name: case for case in CASES}


def _recipe_key() -> str:
    """Changes when this module changes, so a cached file is never a stale recipe's."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:10]


def make_case(name: str, directory: Path) -> Path:
    """Generate (or reuse) the WAV of case `name` in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"hard-{name}-{_recipe_key()}.wav"
    if not path.exists():
        partial = path.with_name(f"partial-{path.name}")
        BY_NAME[name].make(partial)
        partial.rename(path)
    return path


def to_pcm(wav: Path, pcm: Path) -> float:
    """The WAV's samples as the runner's s16le PCM file (header dropped); seconds of audio."""
    _run(["-i", str(wav), "-f", "s16le", *_OUT, str(pcm)])
    return pcm.stat().st_size / 32000
