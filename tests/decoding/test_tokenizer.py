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
