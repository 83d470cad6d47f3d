"""A byte-fallback SentencePiece tokenizer, as multilingual checkpoints have: rare characters are spelled
as UTF-8 byte pieces, so a character can take several tokens, and several decoding steps, to appear."""

from __future__ import annotations

import io

from .nemo_checkpoints import CORPUS

_BYTE_TYPE = 6  # ModelProto.SentencePiece.Type.BYTE


def byte_fallback_proto(vocab_size: int = 300) -> bytes:
    """The serialized model, its pieces reordered so that the bytes 0x80-0xFF (UTF-8 lead and
    continuation bytes, the ones a character can be unfinished at) take ids 1..128, right after <unk>:
    then the tiny test checkpoints' decoders (100 outputs) emit them too."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([*CORPUS, "café au lait", "日本 naïve"]), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=0.99, bos_id=-1, eos_id=-1,
        num_threads=1, minloglevel=2,
    )
    # Reordered on the wire (the generated protobuf module of sentencepiece may not match the installed
    # protobuf runtime): pieces are the model's repeated field 1, each a message whose field 1 is the
    # piece text and field 3 its type.
    fields = list(_fields(model.getvalue()))
    pieces = [raw for number, raw, _ in fields if number == 1]
    high = [p for p in pieces if _is_high_byte(p)]
    low = [p for p in pieces if not _is_high_byte(p)]
    ordered = [low[0], *high, *low[1:]]
    out = bytearray()
    for piece in ordered:
        out += _record(1, piece)
    for number, raw, whole in fields:
        if number != 1:
            out += whole
    return bytes(out)


def _is_high_byte(piece: bytes) -> bool:
    values = {number: raw for number, raw, _ in _fields(piece)}
    return values.get(3) == _BYTE_TYPE and int(values[1].decode()[3:5], 16) >= 0x80


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(data: bytes):
    """(field number, payload, the whole record) of each top-level field of a protobuf message."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, value, data[start:pos]
        elif wire == 2:
            length, pos = _varint(data, pos)
            yield number, data[pos : pos + length], data[start : pos + length]
            pos += length
        elif wire == 5:
            yield number, data[pos : pos + 4], data[start : pos + 4]
            pos += 4
        elif wire == 1:
            yield number, data[pos : pos + 8], data[start : pos + 8]
            pos += 8
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")


def _record(number: int, payload: bytes) -> bytes:
    out, key, length = bytearray(), (number << 3) | 2, len(payload)
    for value in (key, length):
        while value >= 0x80:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out) + payload
