"""SentencePiece detokenization and word grouping with the checkpoint's own tokenizer."""

from __future__ import annotations

from ..transcript import Token, Transcript, Word

WORD_START = "\u2581"  # SentencePiece's '▁' marks a piece that begins a word


class Tokenizer:
    def __init__(self, model_proto: bytes):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(model_proto)
        self.vocab_size = self.sp.get_piece_size()

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode_ids([int(i) for i in ids])

    def transcript(
        self, labels: list[int], frames: list[int], durations: list[int], frame_samples: int, sample_rate: int
    ) -> Transcript:
        """Build a Transcript from decoded labels and their encoder-frame times."""
        tokens = [
            Token(id=lab, text=self.sp.id_to_piece(lab), start=f * frame_samples, end=(f + d) * frame_samples)
            for lab, f, d in zip(labels, frames, durations)
        ]
        words: list[Word] = []
        group: list[Token] = []
        for tok in tokens + [None]:
            if group and (tok is None or tok.text.startswith(WORD_START)):
                text = self.decode([t.id for t in group]).strip()
                if text:
                    words.append(Word(text=text, start=group[0].start, end=max(t.end for t in group)))
                group = []
            if tok is not None:
                group.append(tok)
        return Transcript(text=self.decode(labels), tokens=tokens, words=words, sample_rate=sample_rate)
