"""bench/accuracy.py: the normalisers and the WER/CER arithmetic (no model, no audio)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.accuracy import (
    JFK_TEXT,
    Score,
    corpus,
    find_samples,
    metric_for,
    normalise_chinese,
    normalise_words,
    score,
    spoken_talk_reference,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Ask not, what your country can do!", "ask not what your country can do"),
        ("  And   so,\tmy\nfellow  Americans. ", "and so my fellow americans"),
        ("Don't stop — it's “fine”…", "dont stop its fine"),
        ("well-known", "well known"),
        ("", ""),
    ],
)
def test_normalise_words(text: str, expected: str) -> None:
    assert normalise_words(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("今天我们学习佛经。", "今天我们学习佛经"),
        ("今天我們學習佛經。", "今天我们学习佛经"),  # Traditional -> Simplified
        ("这个问题很重要，请大家认真听讲！", "这个问题很重要请大家认真听讲"),
        ("「我們」：應該？ 怎樣、對待", "我们应该怎样对待"),
        ("我們 讀 Dhamma, 好嗎?", "我们读dhamma好吗"),  # ASCII marks, Latin lowercased
        ("ＡＢＣ１２３", "abc123"),  # full-width letters and digits folded
    ],
)
def test_normalise_chinese(text: str, expected: str) -> None:
    assert normalise_chinese(text) == expected


def test_metric_by_language() -> None:
    assert metric_for("en") == "WER"
    assert metric_for("zh") == "CER"
    assert metric_for("zh-Hant") == "CER"
    assert metric_for("yue") == "CER"


def test_wer_of_known_pairs() -> None:
    # one deletion in six words
    assert score("the cat sat on the mat", "the cat sat on mat", "en") == Score("WER", 1, 6)
    # one substitution, one insertion
    assert score("ask not what", "ask knot what now", "en") == Score("WER", 2, 3)
    assert score("a b c", "", "en") == Score("WER", 3, 3)
    assert score(JFK_TEXT, JFK_TEXT.upper(), "en").rate == 0.0


def test_punctuation_and_case_are_ignored() -> None:
    hypothesis = "and so my fellow americans ask not what your country can do for you ask what"
    hypothesis += " you can do for your country"
    assert score(JFK_TEXT, hypothesis, "en") == Score("WER", 0, 22)
    assert score("今天，我们学习佛经。", "今天我们学习佛经", "zh").edits == 0


def test_traditional_and_simplified_are_equal_after_normalisation() -> None:
    assert score("今天我们学习佛经。", "今天我們學習佛經。", "zh") == Score("CER", 0, 8)
    assert score("學習佛法需要耐心和恆心", "学习佛法需要耐心和恒心", "zh").rate == 0.0


def test_cer_of_known_pairs() -> None:
    # one substitution (经 -> 法) in eight characters
    assert score("今天我们学习佛经", "今天我们学习佛法", "zh") == Score("CER", 1, 8)
    # one deletion, one insertion
    assert score("认真听讲", "认真的听", "zh") == Score("CER", 2, 4)


def test_empty_reference_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        score("。，", "something", "zh")


def test_corpus_totals_are_not_a_mean_of_rates() -> None:
    scores = [Score("WER", 1, 2), Score("WER", 0, 98), Score("CER", 3, 10)]
    totals = corpus(scores)
    assert totals["WER"] == Score("WER", 1, 100)
    assert totals["WER"].rate == 0.01  # the mean of the rates would be 0.25
    assert totals["CER"] == Score("CER", 3, 10)
    assert math.isnan(Score("WER", 0, 0).rate)


def test_spoken_talk_reference() -> None:
    text = spoken_talk_reference(3)
    assert normalise_words(text).split() == normalise_words(JFK_TEXT).split() * 3


def test_find_samples(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")
    (tmp_path / "b.mp3").write_bytes(b"")
    (tmp_path / "b.txt").write_text("你好", encoding="utf-8")
    (tmp_path / "b.lang").write_text("zh\n")
    (tmp_path / "c.m4a").write_bytes(b"")  # no reference: skipped
    samples = find_samples(tmp_path, "en")
    assert [(s.audio.name, s.reference, s.language) for s in samples] == [
        ("a.wav", "hello", "en"),
        ("b.mp3", "你好", "zh"),
    ]
