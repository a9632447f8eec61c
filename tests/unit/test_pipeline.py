"""The runner every verb uses (converter/pipeline.py), and the shape rules the architecture keeps."""

from __future__ import annotations

import ast
import io
import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from converter.disk import build, export
from converter.errors import Interrupted
from converter.inspect import PIPELINE as INSPECT
from converter.pipeline import Context, Pipeline, Slot, Step, run_interruptibly
from converter.progress import JsonMonitor, NullMonitor

ROOT = Path(__file__).resolve().parents[2] / "converter"

NUMBER: Slot[int] = Slot("number")
DOUBLED: Slot[int] = Slot("doubled")
TEXT: Slot[str] = Slot("text")


def _double(ctx: Context) -> int:
    return ctx[NUMBER] * 2


def _show(ctx: Context) -> str:
    return f"{ctx[NUMBER]} -> {ctx[DOUBLED]}"


def test_a_pipeline_runs_its_steps_in_order_and_returns_its_result() -> None:
    pipeline = Pipeline("demo", (Step("double", "doubling", _double, DOUBLED, (NUMBER,)),
                                 Step("show", "showing", _show, TEXT, (NUMBER, DOUBLED))), TEXT, given=(NUMBER,))
    assert pipeline.run(NullMonitor(), number=21) == "21 -> 42"
    assert pipeline.step_ids == ("double", "show")


def test_a_step_that_needs_what_no_earlier_step_makes_is_refused_when_declared() -> None:
    with pytest.raises(TypeError, match="doubled needed before anything makes it"):
        Pipeline("demo", (Step("show", "showing", _show, TEXT, (NUMBER, DOUBLED)),
                          Step("double", "doubling", _double, DOUBLED, (NUMBER,))), TEXT, given=(NUMBER,))


def test_repeated_step_ids_and_a_missing_result_are_refused() -> None:
    with pytest.raises(TypeError, match="repeat"):
        Pipeline("demo", (Step("x", "a", _double, DOUBLED, (NUMBER,)), Step("x", "b", _show, TEXT)), TEXT,
                 given=(NUMBER,))
    with pytest.raises(TypeError, match="nothing makes the result"):
        Pipeline("demo", (Step("double", "doubling", _double, DOUBLED, (NUMBER,)),), TEXT, given=(NUMBER,))


def test_the_monitor_gets_stable_ids_titles_and_durations() -> None:
    stream = io.StringIO()
    pipeline = Pipeline("demo", (Step("double", "doubling the number", _double, DOUBLED, (NUMBER,)),), DOUBLED,
                        given=(NUMBER,))
    pipeline.run(JsonMonitor(stream), number=1)
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["event"], e["id"], e["step"]) for e in events] == [("step", "double", "doubling the number"),
                                                                  ("step-done", "double", "doubling the number")]
    assert events[1]["seconds"] >= 0


def test_resources_entered_by_steps_are_released_however_the_run_ends() -> None:
    released: list[str] = []

    @contextmanager
    def resource(name: str) -> Iterator[str]:
        try:
            yield name
        finally:
            released.append(name)

    def take(ctx: Context) -> str:
        return ctx.enter(resource("scratch"))

    def fail(ctx: Context) -> int:
        raise Interrupted(f"stopped while holding {ctx[TEXT]}")

    ok = Pipeline("ok", (Step("take", "taking", take, TEXT),), TEXT)
    assert ok.run(NullMonitor()) == "scratch" and released == ["scratch"]
    failing = Pipeline("failing", (Step("take", "taking", take, TEXT), Step("fail", "failing", fail, NUMBER)),
                       NUMBER)
    with pytest.raises(Interrupted, match="holding scratch"):
        failing.run(NullMonitor())
    assert released == ["scratch", "scratch"]


def test_run_interruptibly_returns_the_value_and_raises_the_error_of_its_work() -> None:
    assert run_interruptibly(lambda: 7) == 7
    with pytest.raises(ValueError, match="boom"):
        run_interruptibly(lambda: (_ for _ in ()).throw(ValueError("boom")))


def test_a_signal_interrupts_the_main_thread_while_the_work_blocks() -> None:
    def handler(signum: int, _frame: object) -> None:
        raise Interrupted("interrupted")

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        threading.Timer(0.3, lambda: signal.raise_signal(signal.SIGUSR1)).start()
        start = time.monotonic()
        with pytest.raises(Interrupted):
            run_interruptibly(lambda: time.sleep(30))
        assert time.monotonic() - start < 5
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_every_verb_declares_its_steps_with_stable_ids() -> None:
    # no appliance: the files written by debugfs, extlinux installed from its template
    assert build.pipeline("keep").step_ids == (
        "check-inputs", "read-image", "plan", "create-disk", "partition", "read-layers", "choose-kernel",
        "add-imgconv-files", "write-files", "install-boot", "write-boot-files", "settle-filesystem", "finish-disk",
        "publish")
    assert build.pipeline("convert").step_ids == build.pipeline("keep").step_ids
    # an image's own kernel: the same files written while the appliance starts; it reads the kernel, runs extlinux
    assert build.pipeline("keep", unpack="debugfs").step_ids == (
        "check-inputs", "read-image", "plan", "create-disk", "partition", "launch-appliance", "read-layers",
        "choose-kernel", "add-imgconv-files", "write-files", "mount-root", "install-boot", "close-appliance",
        "write-boot-files", "settle-filesystem", "finish-disk", "publish")
    # what debugfs cannot be given is unpacked by the appliance's GNU tar
    assert build.pipeline("keep", unpack="appliance").step_ids == (
        "check-inputs", "read-image", "plan", "create-disk", "partition", "launch-appliance", "write-rootfs",
        "choose-kernel", "add-imgconv-files", "install-boot", "close-appliance", "write-boot-files",
        "settle-filesystem", "finish-disk", "publish")
    # an incremental rebuild starts no appliance
    assert build.rebuild_pipeline().step_ids == (
        "check-inputs", "read-image", "find-base", "copy-base", "check-base", "apply-layers", "update-imgconv-files",
        "settle-filesystem", "finish-disk", "publish")
    assert export.PIPELINE.step_ids == ("check-inputs", "open-disk", "read-base", "launch-appliance", "find-os",
                                        "write-layer", "close-appliance", "write-image", "deliver")
    assert INSPECT.step_ids == ("read-image", "verify-layers", "report")


def _functions() -> Iterator[tuple[Path, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield path, node


def test_no_function_in_converter_is_longer_than_60_lines() -> None:
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({(node.end_lineno or 0) - node.lineno + 1})"
            for path, node in _functions() if (node.end_lineno or 0) - node.lineno + 1 > 60]
    assert long == []


def test_no_context_manager_is_entered_by_hand() -> None:
    by_hand = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("__enter__", "__exit__"):
                by_hand.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert by_hand == []


def test_errors_keep_their_cause() -> None:
    """`raise ... from None` hides what failed underneath from --debug's traceback (issue 8 item 6)."""
    hidden = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Raise) and isinstance(node.cause, ast.Constant) and node.cause.value is None:
                hidden.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert hidden == []
