"""exact_fp32: float32 model code runs without TF32 and gives the user's torch settings back."""

from __future__ import annotations

import pytest


_PRECISION_SCRIPT = r"""
import sys, torch
import monosemantic
from monosemantic.models.precision import exact_fp32

if sys.argv[1] == "new_api":
    # PyTorch's recommended TF32 switch since 2.9; reading the legacy allow_tf32 flag afterwards raises.
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    model = monosemantic.load_model(sys.argv[2], device="cpu")
    assert model.transcribe(torch.zeros(16000).numpy()) is not None
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # the user's setting is back
else:
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = True
    with exact_fp32(torch.float32):
        assert torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark, "cuDNN flags reset"
    assert torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
print("OK")
"""


@pytest.mark.parametrize("case", ["new_api", "cudnn_flags"])
def test_exact_fp32_leaves_the_users_torch_settings_alone(nemo_checkpoint, case):
    """exact_fp32 read `torch.backends.cuda.matmul.allow_tf32`, which raises RuntimeError ("mix of the
    legacy and new APIs") once the user has set TF32 the way PyTorch >= 2.9 recommends: every float32
    encoder call failed, on CPU too. It also entered `torch.backends.cudnn.flags(...)`, which resets
    cudnn.deterministic and cudnn.benchmark to False inside. Run in a subprocess: these flags are global."""
    import subprocess
    import sys

    import torch

    if case == "new_api" and not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision API")
    result = subprocess.run(
        [sys.executable, "-c", _PRECISION_SCRIPT, case, str(nemo_checkpoint("nemotron_rnnt"))],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def _tf32_flags() -> tuple[object, object]:
    """The process-wide TF32 settings exact_fp32 changes, through the API it uses on this torch."""
    import torch

    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        return matmul.fp32_precision, conv.fp32_precision
    return matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set_tf32_flags(flags: tuple[object, object]) -> None:
    import torch

    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        matmul.fp32_precision, conv.fp32_precision = flags
    else:
        matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.mark.parametrize("last_out", ["first_in", "second_in"])
def test_exact_fp32_overlapping_threads_keep_fp32_until_the_last_one_leaves(last_out):
    """A shared model runs in several engine loop threads (and the user's thread) at once. Each entry
    saved the flags it found and restored them on exit, so with two overlapping entries the first to leave
    gave TF32 back while the other still computed, and the second then 'restored' the fp32 setting it had
    found, leaving the process without the user's TF32 for good."""
    import threading

    import torch

    from monosemantic.models.precision import exact_fp32

    user = _tf32_flags()
    user_tf32 = ("tf32", "tf32") if isinstance(user[0], str) else (True, True)
    exact = ("ieee", "ieee") if isinstance(user[0], str) else (False, False)
    _set_tf32_flags(user_tf32)
    try:
        inside: dict[str, tuple[object, object]] = {}
        errors: list[BaseException] = []
        first_in, second_in, first_out_done = threading.Event(), threading.Event(), threading.Event()
        second_out_done = threading.Event()

        def wait(event: threading.Event) -> None:
            assert event.wait(10), "the other thread did not get there"

        def first() -> None:
            try:
                with exact_fp32(torch.float32):
                    first_in.set()
                    wait(second_in)
                    if last_out == "first_in":
                        wait(second_out_done)
                    inside["first"] = _tf32_flags()
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
            finally:
                first_in.set()
                first_out_done.set()

        def second() -> None:
            try:
                wait(first_in)
                with exact_fp32(torch.float32):
                    second_in.set()
                    if last_out == "second_in":
                        wait(first_out_done)
                    inside["second"] = _tf32_flags()
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
            finally:
                second_in.set()
                second_out_done.set()

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert not errors, errors
        assert inside == {"first": exact, "second": exact}, "TF32 came back while a thread still computed"
        assert _tf32_flags() == user_tf32, "the user's TF32 setting was not given back"
        # The count is back to zero: a later entry saves and sets afresh.
        with exact_fp32(torch.float32):
            assert _tf32_flags() == exact
        assert _tf32_flags() == user_tf32
    finally:
        _set_tf32_flags(user)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no os.fork on this platform")
def test_a_child_forked_while_a_thread_is_inside_exact_fp32_gets_the_users_settings():
    """The count of threads inside is process state: a child forked while a parent thread was inside
    inherited it, with no thread of its own to bring it to zero, and kept TF32 off for good."""
    import os
    import threading

    import torch

    from monosemantic.models.precision import exact_fp32

    user = _tf32_flags()
    user_tf32 = ("tf32", "tf32") if isinstance(user[0], str) else (True, True)
    exact = ("ieee", "ieee") if isinstance(user[0], str) else (False, False)
    _set_tf32_flags(user_tf32)
    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with exact_fp32(torch.float32):
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert inside.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: report through the exit status only
            ok = _tf32_flags() == user_tf32
            with exact_fp32(torch.float32):
                ok = ok and _tf32_flags() == exact
            ok = ok and _tf32_flags() == user_tf32
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child did not get the user's TF32 settings back"
    finally:
        leave.set()
        thread.join(10)
        _set_tf32_flags(user)
