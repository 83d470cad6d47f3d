"""A LiveKit voice agent that hears through monosemantic (local streaming speech recognition).

    pip install 'monosemantic[livekit]' livekit-plugins-openai      # or the plugins of your LLM/TTS
    export OPENAI_API_KEY=...
    python examples/livekit_agent.py console                         # talk to it in the terminal
    python examples/livekit_agent.py dev                             # join LiveKit rooms (LIVEKIT_URL, ...)

The LLM and TTS are yours to choose, by environment variable:
    AGENT_LLM=openai:gpt-4.1-mini     a plugin ("<plugin>:<model>", imports livekit.plugins.<plugin>)
    AGENT_LLM=openai/gpt-4.1-mini     or a LiveKit Inference model string, passed to AgentSession as is
    AGENT_TTS=openai:gpt-4o-mini-tts  the same two forms for the TTS
Speech recognition: MONOSEMANTIC_MODEL (Hugging Face id or .nemo path), MONOSEMANTIC_DEVICE,
MONOSEMANTIC_LATENCY_MS; or MONOSEMANTIC_URL=ws://host:8080 (and MONOSEMANTIC_API_KEY) to use a
`monosemantic serve` instance shared by every worker process instead of a model in this one. Silero VAD (livekit-plugins-silero) decides turns and flushes the STT.

The model loads once per process in `setup` (before jobs arrive); every session of the process then
shares that one engine, batched together. A model that could not be found stops the agent at start.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, JobProcess, cli

from livekit.plugins import monosemantic

DEFAULT_LLM = "openai:gpt-4.1-mini"
WORKER_COMMANDS = ("console", "dev", "start", "connect")  # the commands that start processes running `setup`
DEFAULT_TTS = "openai:gpt-4o-mini-tts"


def latency_from_env() -> int:
    value = os.environ.get("MONOSEMANTIC_LATENCY_MS") or "160"
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"MONOSEMANTIC_LATENCY_MS must be a whole number of milliseconds (such as 160), got {value!r}") from None


def build_stt(**overrides) -> monosemantic.STT:
    options = dict(
        model=os.environ.get("MONOSEMANTIC_MODEL") or None,
        device=os.environ.get("MONOSEMANTIC_DEVICE", "auto"),
        latency_ms=latency_from_env(),
    )
    if os.environ.get("MONOSEMANTIC_URL"):
        options = dict(base_url=os.environ["MONOSEMANTIC_URL"], latency_ms=options["latency_ms"])
    options.update(overrides)
    return monosemantic.STT(**options)


def check_model() -> None:
    """Stop at start, in one line, on a model the worker processes cannot find. Each of them loads it in
    `setup`, where LiveKit reports a failure as a traceback for every process, and keeps starting more.
    A Hugging Face id is fetched into its cache here (the processes then find it there); a local
    checkpoint must exist (the processes read it)."""
    if os.environ.get("MONOSEMANTIC_URL"):
        return  # the server has its model
    from monosemantic import DEFAULT_MODEL, ModelLoadError
    from monosemantic.models.checkpoint import download_from_hub

    spec = os.environ.get("MONOSEMANTIC_MODEL") or DEFAULT_MODEL
    if Path(spec).expanduser().exists():
        return
    repo_id = spec.count("/") == 1 and not spec.startswith(("/", ".", "~")) and not spec.endswith(".nemo")
    if not repo_id:
        raise SystemExit(
            f"error: MONOSEMANTIC_MODEL={spec!r}: no such file or directory, and not a Hugging Face repo id "
            f"('org/name'); give a .nemo file, an extracted checkpoint directory or a repo id"
        )
    try:
        download_from_hub(spec)
    except ModelLoadError as exc:
        raise SystemExit(f"error: MONOSEMANTIC_MODEL={spec!r}: {exc}") from None


def build_model(spec: str, kind: str):
    """'plugin:model' -> livekit.plugins.<plugin>.<kind>(model=...); anything else is returned as is (a
    LiveKit Inference model string the session resolves)."""
    if ":" not in spec:
        return spec
    plugin, model = spec.split(":", 1)
    try:
        module = importlib.import_module(f"livekit.plugins.{plugin}")
    except ImportError:
        raise SystemExit(
            f"{kind} '{spec}' needs the LiveKit {plugin} plugin: pip install livekit-plugins-{plugin} "
            f"(or choose another with AGENT_{kind}=<plugin>:<model>)"
        ) from None
    return getattr(module, kind)(model=model)


def setup(proc: JobProcess) -> None:
    from livekit.plugins import silero

    proc.userdata["vad"] = silero.VAD.load()
    stt = build_stt()
    stt.prewarm()  # no event loop here: loads the model now, before the first job
    proc.userdata["stt"] = stt


server = AgentServer(setup_fnc=setup)


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    session = AgentSession(
        stt=ctx.proc.userdata["stt"],
        vad=ctx.proc.userdata["vad"],
        llm=build_model(os.environ.get("AGENT_LLM", DEFAULT_LLM), "LLM"),
        tts=build_model(os.environ.get("AGENT_TTS", DEFAULT_TTS), "TTS"),
    )
    await session.start(
        agent=Agent(instructions="You are a friendly voice assistant. Answer briefly."), room=ctx.room
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in WORKER_COMMANDS:
        check_model()
    cli.run_app(server)
