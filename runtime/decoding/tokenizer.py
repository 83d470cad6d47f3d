"""SentencePiece detokenization and word grouping with the checkpoint's own tokenizer."""

from __future__ import annotations

import random
import re
import unicodedata

from ..transcript import Token, Transcript, Word

WORD_START = "\u2581"  # SentencePiece's '▁' marks a piece that begins a word
REPLACEMENT = "\ufffd"  # what SentencePiece decodes bytes that are not (yet) UTF-8 to
# Pieces whose characters do not count as the vocabulary's punctuation (NeMo's
# extract_punctuation_from_vocab): special tokens, word-start pieces, whitespace.
_NOT_PUNCTUATION_SOURCE = re.compile(r"^(\[.*\]|<.*>|##|\u2581|\s*$)")


class Tokenizer:
    def __init__(self, model_proto: bytes):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(model_proto)
        self.vocab_size = self.sp.get_piece_size()
        self._plain: dict[int, str] = {}  # id -> text of the ids `extend` may append
        self._find_plain_pieces()
        self._bytes = frozenset(i for i in range(self.vocab_size) if self.sp.is_byte(i))  # byte-fallback pieces
        self._find_word_rules()

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode_ids([int(i) for i in ids])

    def extend(self, text: str, ids: list[int], start: int) -> str:
        """decode(ids), given text == decode(ids[:start]): the streaming partial, in time proportional to
        the new ids rather than to the whole utterance. Falls back to a full decode while the text is
        empty (SentencePiece drops the first word's leading space) and when a new id is not a plain piece
        (bytes, unknown, control, inner spaces), whose decoding depends on its neighbours."""
        pieces = [self._plain.get(i) for i in ids[start:]]
        if not text or None in pieces:
            return self.decode(ids)
        return text + "".join(pieces)

    def settled(self, text: str, ids: list[int]) -> str:
        """`text` (== decode(ids)) less a character whose bytes are still arriving: a byte-fallback
        tokenizer spells a rare character as byte pieces, and SentencePiece decodes an unfinished one as
        U+FFFD, which the next piece may turn into the character ('caf' + <0xC3> -> 'caf\ufffd', then
        + <0xA9> -> 'café'). What is left is a prefix of every later decode: UTF-8 is self-synchronizing,
        so only that trailing run can still change."""
        if ids and ids[-1] in self._bytes:
            return text.rstrip(REPLACEMENT)
        return text

    def _find_plain_pieces(self) -> None:
        """Fill `_plain` with the ids whose decoding is plain concatenation ('▁' -> ' '). Checked against
        SentencePiece itself on sample sequences; any difference empties it (no shortcut)."""
        sp = self.sp
        for i in range(self.vocab_size):
            piece = sp.id_to_piece(i)
            special = sp.is_unknown(i) or sp.is_control(i) or sp.is_unused(i) or sp.is_byte(i)
            if not special and piece and WORD_START not in piece[1:]:
                self._plain[i] = piece.replace(WORD_START, " ")
        rng = random.Random(0)
        ids = sorted(self._plain)
        for _ in range(64 if ids else 0):
            seq = [rng.choice(ids) for _ in range(rng.randint(2, 12))]
            cut = rng.randint(1, len(seq) - 1)
            if self.extend(self.decode(seq[:cut]), seq, cut) != self.decode(seq):
                self._plain.clear()
                return

    def _find_word_rules(self) -> None:
        """Which ids start a word and which are punctuation, by NeMo's rules (`get_words_offsets`): a
        piece with '▁' starts a word, as does an unknown or control piece (NeMo: its piece is not its
        text; <unk> decodes as ' ⁇ ', which glued into a word made a word with spaces); byte pieces
        continue theirs. A piece whose text is one of the vocabulary's punctuation marks ('.', '▁,')
        never starts a word: it joins the one before."""
        sp = self.sp
        marks = {
            ch
            for i in range(self.vocab_size)
            if not _NOT_PUNCTUATION_SOURCE.match(sp.id_to_piece(i))
            for ch in sp.id_to_piece(i)
            if unicodedata.category(ch).startswith("P")
        }
        self._punctuation = frozenset(i for i in range(self.vocab_size) if sp.decode_ids([i]) in marks)
        self._word_starts = frozenset(
            i
            for i in range(self.vocab_size)
            if i not in self._punctuation
            and (sp.id_to_piece(i).startswith(WORD_START) or sp.is_unknown(i) or sp.is_control(i) or sp.is_unused(i))
        )

    def transcript(
        self,
        labels: list[int],
        frames: list[int],
        durations: list[int],
        frame_samples: int,
        sample_rate: int,
        tdt: bool = False,
    ) -> Transcript:
        """Build a Transcript from decoded labels and their encoder-frame times. `tdt`: a punctuation mark
        after another token takes that token's end as its start and end, as NeMo's TDT timestamps do
        (`_refine_timestamps_tdt`: TDT models often emit the mark long after its word, in the silence
        that follows; its word would end there)."""
        tokens: list[Token] = []
        for lab, f, d in zip(labels, frames, durations):
            start, end = f * frame_samples, (f + d) * frame_samples
            if tdt and tokens and lab in self._punctuation:
                start = end = tokens[-1].end
            tokens.append(Token(id=lab, text=self.sp.id_to_piece(lab), start=start, end=end))
        words: list[Word] = []
        group: list[Token] = []
        for tok in tokens + [None]:
            if group and (tok is None or tok.id in self._word_starts):
                text = self.decode([t.id for t in group]).strip()
                if text:
                    words.append(Word(text=text, start=group[0].start, end=max(t.end for t in group)))
                group = []
            if tok is not None:
                group.append(tok)
        return Transcript(text=self.decode(labels), tokens=tokens, words=words, sample_rate=sample_rate)
