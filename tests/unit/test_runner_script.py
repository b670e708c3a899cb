"""Chinese script and prompts (jobrunner/script.py): OpenCC conversion on known text, the
language tags a job may carry (hostile ones included), and the settings that choose them."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from dharma_common.settings import ConfigError, load_settings
from jobrunner.errors import PermanentError
from jobrunner.pipeline import job_speech
from jobrunner.script import (
    MAX_PROMPT_CHARS,
    JobLanguage,
    LanguageError,
    Script,
    Speech,
    check_prompt,
    convert_segments,
    converter,
    han_share_changed,
    parse_language,
)
from jobrunner.settings import DEFAULT_PROMPTS, RunnerSettings
from jobrunner.store import Attempt
from jobrunner.subtitles import Segment, render_webvtt

SIMPLIFIED = "这个问题很重要，请大家认真听讲。学习佛经需要耐心。"
TRADITIONAL = "這個問題很重要，請大家認真聽講。學習佛經需要耐心。"


@pytest.mark.parametrize(
    ("script", "text", "expected"),
    [
        (Script.TRADITIONAL, SIMPLIFIED, TRADITIONAL),
        (Script.SIMPLIFIED, TRADITIONAL, SIMPLIFIED),
        # mixed input: each config leaves what is already in its script alone
        (Script.SIMPLIFIED, "这個問题", "这个问题"),
        (Script.TRADITIONAL, "这個問题", "這個問題"),
        # Taiwan and Hong Kong standard variants of the same Traditional characters
        (Script.TRADITIONAL, "里面", "裏面"),
        (Script.TAIWAN, "里面", "裡面"),
        (Script.HONGKONG, "里面", "裏面"),
        (Script.TRADITIONAL, "为什么", "爲什麼"),
        (Script.TAIWAN, "为什么", "為什麼"),
        (Script.HONGKONG, "为什么", "為什麼"),
        (Script.TRADITIONAL, "台湾的温度，他说", "臺灣的溫度，他說"),
        (Script.TAIWAN, "台湾的温度，他说", "臺灣的溫度，他說"),
        (Script.HONGKONG, "台湾的温度，他说", "台灣的温度，他説"),
        # as written: untouched, whichever script
        (Script.AS_WRITTEN, SIMPLIFIED, SIMPLIFIED),
        (Script.AS_WRITTEN, TRADITIONAL, TRADITIONAL),
        # neither Latin text nor punctuation changes
        (Script.TRADITIONAL, "Dharma talk 2025, part 1: OK?", "Dharma talk 2025, part 1: OK?"),
        (Script.SIMPLIFIED, "「你好」——再見！", "「你好」——再见！"),
    ],
)
def test_conversion_table(script: Script, text: str, expected: str) -> None:
    assert converter(script)(text) == expected


def test_segments_keep_their_times_and_rows_match_the_webvtt() -> None:
    segments = [Segment(0, 1500, "今天我们学习佛经。"), Segment(1500, 4000, "请大家认真听讲。")]
    converted = convert_segments(segments, Script.TAIWAN, "zh")
    assert converted == [
        Segment(0, 1500, "今天我們學習佛經。"),
        Segment(1500, 4000, "請大家認真聽講。"),
    ]
    vtt = render_webvtt(converted)
    assert all(s.text in vtt for s in converted) and "们" not in vtt


def test_han_share_changed_measures_how_far_text_is_from_a_script() -> None:
    assert han_share_changed(SIMPLIFIED, Script.SIMPLIFIED) == (22, 0)
    han, changed = han_share_changed(TRADITIONAL, Script.SIMPLIFIED)
    assert han == 22 and changed == 11  # 這個問題 請 認 聽講 學習 經
    assert han_share_changed("hello, world", Script.SIMPLIFIED) == (0, 0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("zh", JobLanguage("zh")),
        ("en", JobLanguage("en")),
        ("auto", JobLanguage("auto")),
        ("yue", JobLanguage("yue")),
        ("zh-Hans", JobLanguage("zh", Script.SIMPLIFIED)),
        ("zh-Hant", JobLanguage("zh", Script.TRADITIONAL)),
        ("zh-hant", JobLanguage("zh", Script.TRADITIONAL)),
        ("zh-CN", JobLanguage("zh", Script.SIMPLIFIED)),
        ("zh-SG", JobLanguage("zh", Script.SIMPLIFIED)),
        ("zh-TW", JobLanguage("zh", Script.TAIWAN)),
        ("zh-tw", JobLanguage("zh", Script.TAIWAN)),
        ("zh-HK", JobLanguage("zh", Script.HONGKONG)),
        ("zh-MO", JobLanguage("zh", Script.HONGKONG)),
        ("zh-Hant-TW", JobLanguage("zh", Script.TAIWAN)),
        ("zh-Hant-HK", JobLanguage("zh", Script.HONGKONG)),
        ("zh-Hant-CN", JobLanguage("zh", Script.TRADITIONAL)),
        ("zh-Hans-TW", JobLanguage("zh", Script.SIMPLIFIED)),  # the script subtag wins
        ("yue-Hant", JobLanguage("yue", Script.TRADITIONAL)),
    ],
)
def test_language_tags(value: str, expected: JobLanguage) -> None:
    assert parse_language(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "", "zh_TW", "zh-", "zh-Hant-", "zh-Latn", "zh-Hans-Hant", "zh-FR", "zh-TW-HK",
        "en-US", "en-Hant", "auto-Hant", "ZH", "Zh-Hant", " zh", "zh ", "zh\n", "zh-TW\x00",
        "zh;DROP TABLE dharma.subtitles", "../zh", "中文", "zh-Ｈant", "z" * 10_000,
        "zh-Hant-TW-x-private", "1234",
    ],
)  # fmt: skip
def test_hostile_language_values_are_permanent_and_short(value: str) -> None:
    with pytest.raises(LanguageError) as err:
        parse_language(value)
    assert isinstance(err.value, PermanentError)
    assert len(str(err.value)) < 200


def test_script_applies_to_chinese_only() -> None:
    assert JobLanguage("zh").script_for(Script.TAIWAN) is Script.TAIWAN
    assert JobLanguage("zh", Script.SIMPLIFIED).script_for(Script.TAIWAN) is Script.SIMPLIFIED
    assert JobLanguage("en").script_for(Script.TRADITIONAL) is Script.AS_WRITTEN
    # auto: the script the windows detected as Chinese are written in
    assert JobLanguage("auto").script_for(Script.TRADITIONAL) is Script.TRADITIONAL


def test_only_segments_whose_language_is_chinese_are_converted() -> None:
    """A segment's own language (what whisper detected for an `auto` job's window) wins
    over the job's: Japanese kanji and English stay as written in an `auto` talk."""
    segments = [
        Segment(0, 1000, "这个问题", language="zh"),
        Segment(1000, 2000, "学習する", language="ja"),
        Segment(2000, 3000, "The heart sutra", language="en"),
        Segment(3000, 4000, "请大家", language="yue"),
    ]
    assert [s.text for s in convert_segments(segments, Script.TRADITIONAL, "auto")] == [
        "這個問題", "学習する", "The heart sutra", "請大家",
    ]  # fmt: skip
    undetected = [Segment(0, 1000, "这个问题")]  # a zh job's: the job's language decides
    assert convert_segments(undetected, Script.TRADITIONAL, "zh")[0].text == "這個問題"
    assert convert_segments(undetected, Script.TRADITIONAL, "auto")[0].text == "这个问题"
    assert convert_segments(undetected, Script.TRADITIONAL, "en")[0].text == "这个问题"


def test_prompt_bounds() -> None:
    assert check_prompt("以下是普通话的句子。", "p") == "以下是普通话的句子。"
    assert check_prompt("两行\n\t可以", "p")
    assert check_prompt("字" * MAX_PROMPT_CHARS, "p")
    with pytest.raises(PermanentError, match="the job's initial_prompt is 401 characters"):
        check_prompt("字" * (MAX_PROMPT_CHARS + 1), "the job's initial_prompt")
    with pytest.raises(PermanentError, match="control characters"):
        check_prompt("a\x1b[31mred", "p")


def _attempt(language: str | None, prompt: str | None = None) -> Attempt:
    created = dt.datetime(2025, 10, 21, tzinfo=dt.timezone.utc)
    return Attempt(1, 1, uuid.uuid4(), "talks", created, "/u/a.mp3", language, prompt)


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> RunnerSettings:
    monkeypatch.setenv("DB_HOST", "db")
    monkeypatch.setenv("DB_USER", "u")
    monkeypatch.setenv("WEBDAV_BASE_URL", "https://dav.example.org")
    for name in ("WHISPER_LANGUAGE", "CHINESE_SCRIPT", "WHISPER_PROMPTS"):
        monkeypatch.delenv(name, raising=False)
    return load_settings(RunnerSettings)


def test_job_speech_defaults_tags_and_prompts(
    settings: RunnerSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    zh_prompt = DEFAULT_PROMPTS["zh"]
    assert settings.CHINESE_SCRIPT is Script.SIMPLIFIED
    assert job_speech(settings, _attempt(None)) == Speech(
        "zh", Script.SIMPLIFIED, zh_prompt, "setting"
    )
    assert job_speech(settings, _attempt("zh-Hant")).script is Script.TRADITIONAL
    assert job_speech(settings, _attempt("zh-TW")) == Speech(
        "zh", Script.TAIWAN, zh_prompt, "setting"
    )
    assert job_speech(settings, _attempt("en")) == Speech("en", Script.AS_WRITTEN, "", "none")
    assert job_speech(settings, _attempt("zh", "")) == Speech("zh", Script.SIMPLIFIED, "", "job")
    assert job_speech(settings, _attempt("zh-HK", "大家好。")) == Speech(
        "zh", Script.HONGKONG, "大家好。", "job"
    )
    with pytest.raises(PermanentError, match="'zh_TW' is not a language tag"):
        job_speech(settings, _attempt("zh_TW"))
    with pytest.raises(PermanentError, match="'xx' is not one whisper knows"):
        job_speech(settings, _attempt("xx"))
    with pytest.raises(PermanentError, match="initial_prompt is 401"):
        job_speech(settings, _attempt("zh", "字" * 401))
    monkeypatch.setenv("WHISPER_LANGUAGE", "zh-Hant")
    monkeypatch.setenv("CHINESE_SCRIPT", "as-written")
    monkeypatch.setenv("WHISPER_PROMPTS", '{"en": "Hello."}')
    other = load_settings(RunnerSettings)
    assert job_speech(other, _attempt(None)) == Speech("zh", Script.TRADITIONAL, "", "none")
    assert job_speech(other, _attempt("zh")).script is Script.AS_WRITTEN
    assert job_speech(other, _attempt("en")) == Speech("en", Script.AS_WRITTEN, "Hello.", "setting")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CHINESE_SCRIPT", "traditonal", "CHINESE_SCRIPT='traditonal' is invalid"),
        ("WHISPER_LANGUAGE", "zh_TW", "WHISPER_LANGUAGE='zh_TW' is invalid"),
        ("WHISPER_LANGUAGE", "en-US", "only zh and yue take a script"),
        ("WHISPER_PROMPTS", "zh=你好", "must be JSON"),
        ("WHISPER_PROMPTS", '{"zh-Hant": "你好"}', "keys are whisper languages"),
        ("WHISPER_PROMPTS", '{"zh": 5}', "WHISPER_PROMPTS"),
        ("WHISPER_PROMPTS", '["zh"]', "WHISPER_PROMPTS"),
        ("WHISPER_PROMPTS", '{"zh": "' + "字" * 401 + '"}', "at most 400"),
    ],
)
def test_script_and_prompt_settings_errors_name_the_variable(
    settings: RunnerSettings, monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_settings(RunnerSettings)
    assert name in str(err.value) and message in str(err.value)


def test_empty_prompts_setting_means_no_prompt(
    settings: RunnerSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WHISPER_PROMPTS", "")
    assert load_settings(RunnerSettings).WHISPER_PROMPTS == {}
    monkeypatch.setenv("WHISPER_PROMPTS", '{"zh": "以下是普通話的句子。"}')
    assert load_settings(RunnerSettings).WHISPER_PROMPTS == {"zh": "以下是普通話的句子。"}
