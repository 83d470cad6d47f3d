"""Detokenization with the checkpoint's SentencePiece model, word grouping and sample timings."""

from __future__ import annotations


def test_transcript_text_words_and_timings(ms_model, audio_clips):
    model = ms_model("nemotron_tdt")
    result = model.transcribe(audio_clips["jfk.wav"])
    tok = model.tokenizer
    assert result.text == tok.sp.decode_ids(result.token_ids)
    assert " ".join(w.text for w in result.words) == " ".join(result.text.split())
    frame = model.config.frame_samples
    for t in result.tokens:
        assert t.start % frame == 0 and t.end >= t.start and t.text == tok.sp.id_to_piece(t.id)
    assert [t.start for t in result.tokens] == sorted(t.start for t in result.tokens)
    for w in result.words:
        assert w.start <= w.end <= len(audio_clips["jfk.wav"]) + 4 * frame
    as_dict = result.to_dict()
    assert as_dict["tokens"][0]["start"] == round(result.tokens[0].start / 16000, 3)


def test_rnnt_tokens_last_one_frame(ms_model, audio_clips):
    model = ms_model("nemotron_rnnt")
    result = model.transcribe(audio_clips["61-70968-0000.flac"])
    assert result.tokens and all(t.end - t.start == model.config.frame_samples for t in result.tokens)


def test_words_group_pieces_after_a_word_start(ms_model):
    model = ms_model("nemotron_rnnt")
    tok = model.tokenizer
    ids = tok.sp.encode_as_ids("the quick brown fox")
    result = tok.transcript(ids, list(range(len(ids))), [1] * len(ids), frame_samples=1280, sample_rate=16000)
    assert [w.text for w in result.words] == ["the", "quick", "brown", "fox"]
    starts = [i for i, p in enumerate(ids) if tok.sp.id_to_piece(p).startswith("\u2581")]
    assert [w.start for w in result.words] == [s * 1280 for s in starts]
    assert result.words[-1].end == len(ids) * 1280


def test_extend_equals_full_decode_for_any_split(ms_model):
    """The engine's partials extend the text piece by piece; for every id sequence (special ids, unknown
    and out-of-range ones included) and split point, the result is SentencePiece's own decode."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    tok = ms_model("nemotron_rnnt").tokenizer
    assert tok._plain, "the test tokenizer's pieces should take the shortcut"
    special = [i for i in range(tok.vocab_size) if i not in tok._plain]
    ids = st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(special or [0]))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(ids, max_size=30), st.data())
    def check(seq, data):
        cut = data.draw(st.integers(0, len(seq)))
        assert tok.extend(tok.decode(seq[:cut]), seq, cut) == tok.decode(seq)

    check()


def test_extend_uses_the_shortcut_for_plain_pieces(ms_model, monkeypatch):
    tok = ms_model("nemotron_rnnt").tokenizer
    ids = tok.sp.encode_as_ids("the quick brown fox jumps")
    text = tok.decode(ids[:2])
    monkeypatch.setattr(tok, "decode", lambda ids: (_ for _ in ()).throw(AssertionError("full decode")))
    assert tok.extend(text, ids, 2) == "the quick brown fox jumps"


def test_settled_text_is_a_prefix_of_every_later_decode():
    """A byte-fallback tokenizer spells rare characters as UTF-8 byte pieces; an unfinished one decodes
    as U+FFFD, which a later piece turns into the character. `settled` leaves that tail out, so what
    the engine shows as stable is never taken back."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from _support.tokenizers import byte_fallback_proto
    from monosemantic.decoding.tokenizer import Tokenizer

    tok = Tokenizer(byte_fallback_proto())
    ids = tok.sp.encode_as_ids("caf\u00e9 \u65e5\u672c")  # c a f <C3> <A9> ▁ <E6> <97> <A5> <E6> <9C> <AC>
    shown = [tok.settled(tok.decode(ids[:k]), ids[:k]) for k in range(len(ids) + 1)]
    assert shown == ["", "c", "ca", "caf", "caf", "café", "café ", "café ", "café ", "café 日", "café 日", "café 日", "café 日本"]
    pieces = st.one_of(st.sampled_from(sorted(tok._bytes)), st.integers(0, tok.vocab_size - 1))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(pieces, max_size=24))
    def check(seq):
        texts = [tok.decode(seq[:k]) for k in range(len(seq) + 1)]
        for k, text in enumerate(texts):
            settled = tok.settled(text, seq[:k])
            assert text.startswith(settled) and all(later.startswith(settled) for later in texts[k:])

    check()


def test_settled_text_is_the_text_without_byte_pieces(ms_model):
    tok = ms_model("nemotron_rnnt").tokenizer
    assert not tok._bytes
    ids = tok.sp.encode_as_ids("the quick brown fox")
    assert tok.settled(tok.decode(ids), ids) == tok.decode(ids)
