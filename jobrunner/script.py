"""Chinese script of transcripts, and whisper's initial prompt (issue 12, item 1).

whisper writes Chinese in whichever script its context suggests, and may switch between
Simplified and Traditional within a talk. The audience reads one script, so the runner
converts the segments' text once, with OpenCC (the `opencc` package: its dictionaries,
never a hand-written table), before they become subtitle rows and the WebVTT file: both
come from the same converted segments and cannot disagree.

Which script: a job's `language` may name it as a BCP-47-like tag (`zh-Hans`, `zh-Hant`,
`zh-CN`, `zh-TW`, `zh-HK`, ...); whisper is given the base language (`zh`) and the script
picks the OpenCC configuration. A tag without a script uses the deployment's
`CHINESE_SCRIPT`. Only Chinese (`zh`, `yue`) is converted. An `auto` job's language is not
known before the run: whisper detects it per window, and only the windows it detected as
Chinese are converted (to `CHINESE_SCRIPT`); Japanese kanji converted with t2s would be
damaged.

The initial prompt is text whisper continues: its script and punctuation style carry over
to what it writes (docs/performance.md, "Chinese script and prompts", measured).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import Enum
from functools import cache

from jobrunner.errors import PermanentError
from jobrunner.subtitles import Segment


class Script(str, Enum):
    """How Chinese text is written out (CHINESE_SCRIPT and the language tag's script)."""

    SIMPLIFIED = "simplified"
    TRADITIONAL = "traditional"
    TAIWAN = "taiwan"  # Traditional with Taiwan's standard character variants
    HONGKONG = "hongkong"  # Traditional with Hong Kong's standard character variants
    AS_WRITTEN = "as-written"  # whatever whisper wrote, untouched


#: OpenCC configurations shipped in the `opencc` wheel (opencc/clib/share/opencc/*.json).
#: Each accepts mixed input: s2t leaves Traditional characters as they are, t2s Simplified.
#: Character variants only, not vocabulary (s2tw, not s2twp: whisper's words are kept).
OPENCC_CONFIGS: dict[Script, str] = {
    Script.SIMPLIFIED: "t2s",
    Script.TRADITIONAL: "s2t",
    Script.TAIWAN: "s2tw",
    Script.HONGKONG: "s2hk",
}

#: whisper languages written in Chinese characters, whose text is converted.
CHINESE = frozenset({"zh", "yue"})

#: Longest initial prompt (a job's or WHISPER_PROMPTS'): whisper keeps at most
#: n_text_ctx / 2 = 224 prompt tokens and drops the beginning of a longer one; 400
#: characters is already more than that in Chinese (one to three tokens per character).
MAX_PROMPT_CHARS = 400

_SCRIPT_SUBTAGS = {"hans": Script.SIMPLIFIED, "hant": Script.TRADITIONAL}
_REGIONS = {
    "cn": Script.SIMPLIFIED,
    "sg": Script.SIMPLIFIED,
    "tw": Script.TAIWAN,
    "hk": Script.HONGKONG,
    "mo": Script.HONGKONG,  # OpenCC has no Macau variants; Hong Kong's are the closest
}
#: base language (lowercase, as whisper names it), then an optional script subtag and an
#: optional region subtag; subtags are case-insensitive as in BCP 47.
_TAG = re.compile(
    r"(?P<base>[a-z]{2,3}|auto)"
    r"(?:-(?P<script>[Hh][Aa][Nn][SsTt]))?"
    r"(?:-(?P<region>[A-Za-z]{2}))?"
)
_EXAMPLES = "e.g. zh, zh-Hans, zh-Hant, zh-TW, zh-HK, en, auto"


class LanguageError(PermanentError, ValueError):
    """A language value the runner will not use: permanent for a job, a configuration
    error for WHISPER_LANGUAGE (pydantic reports a ValueError naming the variable)."""


@dataclass(frozen=True)
class JobLanguage:
    """A parsed language value: what whisper is given, and the script the tag asks for
    (None: the tag names none, so CHINESE_SCRIPT decides)."""

    whisper: str
    script: Script | None = None

    def script_for(self, default: Script) -> Script:
        """The script this job's Chinese text is written in: as written for a language
        other than Chinese; `default` for `auto` (for the windows detected as Chinese)."""
        if self.whisper not in CHINESE | {"auto"}:
            return Script.AS_WRITTEN
        return self.script or default


def _shown(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:40] + "...")


def parse_language(value: str) -> JobLanguage:
    """`zh`, `en`, `auto`, or a Chinese tag with a script and/or region. Strict: anything
    else (other subtags, `zh_TW`, spaces, control characters) is a `LanguageError`. Whether
    whisper knows the base language is checked by `transcribe.check_language`."""
    match = _TAG.fullmatch(value)
    if match is None:
        raise LanguageError(f"language {_shown(value)} is not a language tag ({_EXAMPLES})")
    base, script, region = match["base"], match["script"], match["region"]
    if not (script or region):
        return JobLanguage(base)
    if base not in CHINESE:
        raise LanguageError(
            f"language {_shown(value)}: only zh and yue take a script or region ({_EXAMPLES})"
        )
    if region is not None and region.lower() not in _REGIONS:
        raise LanguageError(
            f"language {_shown(value)}: region {region!r} is not one of CN, SG, TW, HK, MO"
        )
    if script is None:
        return JobLanguage(base, _REGIONS[region.lower()])
    chosen = _SCRIPT_SUBTAGS[script.lower()]
    if chosen is Script.TRADITIONAL and region is not None:
        regional = _REGIONS[region.lower()]
        chosen = regional if regional is not Script.SIMPLIFIED else chosen
    return JobLanguage(base, chosen)


@dataclass(frozen=True)
class Speech:
    """How one job is transcribed: whisper's language, the script its text is converted
    to, and whisper's initial prompt ("" for none)."""

    language: str
    script: Script
    prompt: str = ""
    prompt_origin: str = "none"  # "job", "setting" or "none", for the log


def check_prompt(prompt: str, origin: str) -> str:
    """A prompt of at most MAX_PROMPT_CHARS characters, without control characters other
    than newlines and tabs; `origin` names where it came from in the error."""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PermanentError(
            f"{origin} is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS} are used"
        )
    if any(ord(c) < 32 and c not in "\n\t" for c in prompt):
        raise PermanentError(f"{origin} contains control characters")
    return prompt


@cache
def converter(script: Script) -> Callable[[str], str]:
    """The text conversion for `script` (the identity for as-written); OpenCC's
    dictionaries load once per process and script."""
    config = OPENCC_CONFIGS.get(script)
    if config is None:
        return lambda text: text
    import opencc

    return opencc.OpenCC(config).convert


def convert_segments(segments: Iterable[Segment], script: Script, language: str) -> list[Segment]:
    """The segments with their Chinese text in `script`; times unchanged. A segment is
    Chinese if the language whisper detected for it (`auto` jobs), else the job's
    `language`, is; other segments are left as written."""
    convert = converter(script)
    return [
        replace(s, text=convert(s.text)) if (s.language or language) in CHINESE else s
        for s in segments
    ]


def han_share_changed(text: str, script: Script) -> tuple[int, int]:
    """(Han characters in `text`, how many of them `script`'s conversion changes): how far
    `text` is from that script (the benchmark's measure; t2s for "how Traditional")."""
    convert = converter(script)
    han = [c for c in text if "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf"]
    changed = sum(1 for c in han if convert(c) != c)
    return len(han), changed
