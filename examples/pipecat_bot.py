"""A Pipecat voice pipeline on your microphone with monosemantic as its speech recognizer.

    pip install 'monosemantic[pipecat]' 'pipecat-ai[local]'     # local audio needs pyaudio (portaudio)
    python examples/pipecat_bot.py                                # print what you say, as you say it
    python examples/pipecat_bot.py --model /path/to/model.nemo --latency-ms 80
    python examples/pipecat_bot.py --url ws://127.0.0.1:8080       # recognize on a `monosemantic serve`
                                                                  # (--api-key, or $MONOSEMANTIC_API_KEY)
    OPENAI_API_KEY=... python examples/pipecat_bot.py --agent openai   # talk to an LLM (pipecat-ai[openai])

The default mode transcribes only: microphone -> Silero VAD -> MonosemanticSTTService -> console. It needs
nothing but a microphone. `--agent openai` adds an LLM and TTS and plays the reply on your speakers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import Frame, InterimTranscriptionFrame, TranscriptionFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker, ProcessorUnusablePolicy
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from monosemantic import DEFAULT_MODEL
from pipecat_monosemantic import MonosemanticSTTService

SAMPLE_RATE = 16000  # Silero VAD runs at 8 or 16 kHz; the microphone is opened at this rate


class TranscriptPrinter(FrameProcessor):
    """Prints interim transcripts over one line and each final on its own line."""

    def __init__(self, out=None):
        super().__init__()
        self._out = out or sys.stdout

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InterimTranscriptionFrame):
            self._out.write(f"\r  ... {frame.text}\033[K")
            self._out.flush()
        elif isinstance(frame, TranscriptionFrame):
            self._out.write(f"\r> {frame.text}\033[K\n")
            self._out.flush()
        await self.push_frame(frame, direction)


def agent_processors(agent: str) -> tuple[list[FrameProcessor], list[FrameProcessor]]:
    """(processors after the STT up to the audio output, processors after the audio output) of an LLM
    agent, imported only when asked for."""
    if agent != "openai":
        raise SystemExit(f"unknown agent {agent!r}; choose 'openai' or leave --agent out to transcribe only")
    try:
        from pipecat.processors.aggregators.llm_context import LLMContext
        from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
        from pipecat.services.openai.llm import OpenAILLMService
        from pipecat.services.openai.tts import OpenAITTSService
    except ImportError as e:
        raise SystemExit(f"--agent openai needs pipecat's OpenAI services: pip install 'pipecat-ai[openai]' ({e})")
    if not os.environ.get("OPENAI_API_KEY"):
        raise SystemExit("--agent openai needs an OpenAI API key in the OPENAI_API_KEY environment variable")
    context = LLMContext(
        [{"role": "system", "content": "You are a helpful voice assistant. Answer briefly, in plain sentences."}]
    )
    aggregators = LLMContextAggregatorPair(context)
    return [aggregators.user(), OpenAILLMService(), OpenAITTSService()], [aggregators.assistant()]


def build_processors(
    audio_in: FrameProcessor,
    stt: MonosemanticSTTService,
    audio_out: FrameProcessor | None = None,
    agent: str | None = None,
    out=None,
) -> list[FrameProcessor]:
    """The pipeline's processors: audio in -> VAD -> STT -> console (-> LLM -> TTS -> audio out)."""
    processors = [audio_in, VADProcessor(vad_analyzer=SileroVADAnalyzer()), stt, TranscriptPrinter(out)]
    if agent:
        before_out, after_out = agent_processors(agent)
        processors += before_out + ([audio_out] if audio_out is not None else []) + after_out
    return processors


def local_audio_transport(with_output: bool):
    try:
        from pipecat.transports.local.audio import LocalAudioTransport, LocalAudioTransportParams
    except ImportError as e:
        raise SystemExit(f"the microphone transport needs pyaudio: pip install 'pipecat-ai[local]' ({e})")
    return LocalAudioTransport(
        LocalAudioTransportParams(
            audio_in_enabled=True, audio_in_sample_rate=SAMPLE_RATE, audio_out_enabled=with_output
        )
    )


def build_stt(args: argparse.Namespace) -> MonosemanticSTTService:
    return MonosemanticSTTService(
        model=args.model,
        device=args.device,
        base_url=args.url,
        api_key=args.api_key,
        settings=MonosemanticSTTService.Settings(latency_ms=args.latency_ms),
    )


async def run(args: argparse.Namespace) -> None:
    transport = local_audio_transport(with_output=bool(args.agent))
    stt = build_stt(args)
    processors = build_processors(transport.input(), stt, transport.output(), args.agent)
    # A service that can never work (a model that does not load, a latency mode it lacks, a refused API
    # key) ends the bot: Pipecat's default keeps it "listening" with nothing to hear it.
    worker = PipelineWorker(
        Pipeline(processors),
        params=PipelineParams(audio_in_sample_rate=SAMPLE_RATE),
        processor_unusable_policy=ProcessorUnusablePolicy.CANCEL,
    )
    print("Loading the model, then listening. Speak; Ctrl-C to stop.", file=sys.stderr)
    runner = WorkerRunner()
    await runner.add_workers(worker)
    await runner.run()
    failed = [str(p) for p in processors if not p.is_usable]
    if failed:
        raise SystemExit(f"error: stopped: {', '.join(failed)} failed for good (the error logged above says why)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=f"Hugging Face repo id or .nemo path (default: {DEFAULT_MODEL})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--latency-ms", type=int, default=160, help="encoder chunk: 80, 160, 560 or 1120")
    parser.add_argument("--url", default=os.environ.get("MONOSEMANTIC_URL"), help="a `monosemantic serve` URL to use instead of a model in this process (default: $MONOSEMANTIC_URL)")
    parser.add_argument("--api-key", default=None, help="the server's key, with --url (default: $MONOSEMANTIC_API_KEY)")
    parser.add_argument("--agent", choices=["openai"], default=None, help="answer with an LLM and TTS (default: off)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    main()
