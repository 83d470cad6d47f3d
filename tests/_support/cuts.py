"""Random streams of pushes, plain flushes and flush(at=...) at every kind of point, and the check of
their Finals against offline transcription: shared by the local engine's and the server's tests."""

from __future__ import annotations

import asyncio

import numpy as np

from monosemantic.audio import StreamResampler, resample


async def drive_with_cuts(stream, rng, clips, rate, coalescing_timing=None, sync_call=None, twin=None, pcm16=False):
    """Random pushes at `rate` (speech and silence, in random piece sizes), plain flushes and flushes at
    a random sample (0, an earlier point, behind the engine after letting it catch up, inside the audio,
    at and past its end). Returns the model-rate audio (a mirror of the stream's resampler: a cut leaves
    it alone, a plain flush takes its tail) and per flush (at, whether it cut inside the audio, the
    point it returned, the audio's end then). `twin`: a stream given the same pushes and plain flushes,
    and no cut (the same model-rate audio). `pcm16`: push int16 (as a remote stream sends)."""
    call = sync_call or (lambda f, *a, **k: f(*a, **k))
    mirror = StreamResampler(rate, 16000)
    audio: list = []
    size = last = 0  # (`last`: the last flush point, or for a remote stream where the server put it at the least)
    flushes: list[tuple] = []
    for round_ in range(rng.randint(3, 6) + 1):
        if round_:
            if rng.random() < 0.6:
                clip = clips[rng.randrange(len(clips))]
                piece = clip[: rng.randint(1, min(len(clip), 2 * 16000))]
            else:
                piece = np.zeros(rng.randint(1, 16000), np.float32)
            piece = resample(piece, 16000, rate) if rate != 16000 else piece
        else:
            piece = np.zeros(0, np.float32)  # a flush at 0 right after the stream opens
        if pcm16:
            piece = np.clip(np.round(piece * 32768.0), -32768, 32767).astype(np.int16)
        j = 0
        while j < len(piece):
            n = rng.choice([1, rate // 50, rate // 50, rate // 10, 4000, 9000])
            chunk = piece[j : j + n]
            await call(stream.push, chunk)
            if twin is not None:
                await call(twin.push, chunk)
            out = mirror.push(chunk.astype(np.float32) / 32768 if pcm16 else chunk)
            audio.append(out)
            size += len(out)
            j += n
            if coalescing_timing is not None:
                # The coalescer holds audio only up to the engine's next step point, counted from the
                # last flush point: the engine never lacks audio a step of the utterance could use.
                t = coalescing_timing
                due = last if size - last < t.first else last + t.first + (size - last - t.first) // t.every * t.every
                assert stream.written >= due, (stream.written, due, size, last)
            if rng.random() < 0.05:
                await asyncio.sleep(0.02)
        for _ in range(rng.choice([0, 1, 1, 2]) if round_ else 1):
            kind = rng.randrange(7) if round_ else 1
            if kind == 0:
                at = None
            elif kind == 1:
                at = 0
            elif kind == 2:
                at = last
            elif kind == 3:
                await asyncio.sleep(0.05)  # the engine catches up: the point is behind what it read
                at = rng.randint(last, size) if last <= size else last
            elif kind == 4:
                at = size + rng.randint(0, 3000)  # at or past the end: a plain flush
            else:
                at = rng.randint(min(last, size), size)
            point = await call(stream.flush, at=at)
            cut = at is not None and at < size
            if not cut:  # a plain flush: the resampler's tail goes in
                if twin is not None:
                    await call(twin.flush)
                tail = mirror.flush()
                audio.append(tail)
                size += len(tail)
            flushes.append((at, cut, point, size))
            if point is not None:
                assert point == size if not cut else max(at, last) <= point <= size, flushes[-1]
            last = point if point is not None else max(last, at) if cut else size
    point = await call(stream.flush)
    if twin is not None:
        await call(twin.flush)
    tail = mirror.flush()
    audio.append(tail)
    size += len(tail)
    flushes.append((None, False, point, size))
    assert point in (None, size)
    return (np.concatenate(audio) if audio else np.zeros(0, np.float32)), flushes


def check_cut_finals(model, latency_ms, audio, flushes, finals, tokens=True, exact=False):
    """The Finals of `drive_with_cuts`'s flushes: one each, in order, covering the audio once, each
    ending at its flush's point (at `at` or after it for a cut, where the audio ended for a plain
    flush), and each equal to its span transcribed alone (`tokens`). `exact`: the engine read none of
    the audio before the flushes, so each cut is at `at`, or at the previous point if that is later."""
    assert len(finals) == len(flushes)
    start = 0
    for k, ((at, cut, point, size), final) in enumerate(zip(flushes, finals)):
        assert final.start == start, (k, final, flushes)
        if point is not None:
            assert final.end == point, (k, final, flushes)
        assert (at <= final.end <= size) if cut else final.end == size, (k, final, flushes[k])
        if exact and cut:
            assert final.end == max(at, start), (k, final, flushes[k])
        part = audio[final.start : final.end]
        if tokens:
            expected = model.transcribe(part, latency_ms=latency_ms).token_ids if len(part) else []
            assert [t.id for t in final.tokens] == expected, (k, final.start, final.end)
        assert all(final.start <= t.start <= t.end <= final.end for t in final.tokens), k
        start = final.end
    assert start == len(audio)
