"""The runner every verb uses: a verb is a typed context plus a declared sequence of named steps.

A step is a plain function of the run's :class:`Context` that returns one typed value, stored in the
context under the step's :class:`Slot`; later steps read it back with ``ctx[SLOT]``, typed. A pipeline
checks when it is *declared* that every slot a step needs is made by an earlier step (or given at the
start), so a step never has to ask "is the kernel known yet?": a misordered pipeline fails at import,
not half-way through a conversion.

Steps have stable ids (``read-image``, ``write-rootfs``, ...). The monitor receives the id, a title for
people and the duration (``--json`` progress and ``make bench`` read the ids). A new capability is a new
step or a second implementation of one (a UEFI bootloader beside extlinux, a store publish beside the
file publish), chosen when the pipeline is assembled, never an ``if`` inside another step.

What every verb repeats lives here once:

- resources (scratch directories, temporary files, open images) are entered into the run's exit stack
  with :meth:`Context.enter` and released however the run ends;
- an :class:`ApplianceSession` runs its inner steps inside one libguestfs appliance, in a worker thread,
  so that SIGINT/SIGTERM are seen at once even while libguestfs blocks in C for minutes;
- the run returns the value of the pipeline's result slot, typed.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from converter.disk.appliance import Appliance, Drive, launch
from converter.progress import Monitor

T = TypeVar("T")
R = TypeVar("R")



@dataclass(frozen=True, eq=False)
class Slot(Generic[T]):
    """A typed place in a run's context for a value no single step function makes: what the verb is given
    (its options), or what either of two implementations of a step makes."""

    name: str

    def __repr__(self) -> str:
        return f"Slot({self.name})"


# A step's output is found under the function that made it (``ctx[plan]`` is what ``plan`` returned), or under
# the Slot the step names: either way typed, with no list of names to keep beside the steps.
Key = Slot[T] | Callable[["Context"], T]


def key_name(key: Key[Any]) -> str:
    return key.name if isinstance(key, Slot) else getattr(key, "__name__", repr(key))


class Context:
    """One run's values (by key), its monitor, and its exit stack of resources."""

    def __init__(self, monitor: Monitor, stack: ExitStack) -> None:
        self.monitor = monitor
        self._stack = stack
        self._values: dict[Key[Any], Any] = {}

    def __getitem__(self, key: Key[T]) -> T:
        try:
            return self._values[key]  # type: ignore[no-any-return]
        except KeyError as exc:
            # Pipeline.__post_init__ rules this out for declared needs; reaching it is a bug in a step.
            raise LookupError(f"{key_name(key)} is read before any step made it") from exc

    def __contains__(self, key: Key[Any]) -> bool:
        return key in self._values

    def optional(self, key: Key[T]) -> T | None:
        """The value under *key*, or None where this run's pipeline has no step that makes it."""
        return self._values.get(key)

    def put(self, key: Key[T], value: T) -> None:
        self._values[key] = value

    def enter(self, resource: AbstractContextManager[T]) -> T:
        """Enter *resource* for the rest of the run; it is exited, in reverse order, however the run ends."""
        return self._stack.enter_context(resource)


@dataclass(frozen=True)
class Step(Generic[T]):
    """One named piece of a verb: *run*'s value is kept under *makes* if given, else under *run* itself."""

    id: str
    title: str
    run: Callable[[Context], T]
    makes: Slot[T] | None = None
    needs: tuple[Key[Any], ...] = ()

    @property
    def key(self) -> Key[T]:
        return self.makes if self.makes is not None else self.run

    def execute(self, ctx: Context) -> None:
        ctx.put(self.key, self.run(ctx))


APPLIANCE: Slot[Appliance] = Slot("appliance")


@dataclass(frozen=True)
class ApplianceSession:
    """Inner steps that run inside one libguestfs appliance with *drives* attached.

    Launch and shutdown are steps of their own (``launch-appliance``, ``close-appliance``), so their cost
    shows in the timings; shutdown is where libguestfs reports a failed flush, so it fails the run.
    """

    drives: Callable[[Context], list[Drive]]
    steps: tuple[Step[Any], ...]
    needs: tuple[Key[Any], ...] = ()
    memory_mib: int = 768
    # Host steps run while the appliance starts (seconds under TCG); they may not use it. The drives' contents
    # may change meanwhile: a step that reads them in the appliance first drops its block caches.
    meanwhile: tuple[Step[Any], ...] = ()


Item = Step[Any] | ApplianceSession


@dataclass(frozen=True)
class Pipeline(Generic[R]):
    """A verb: its steps in order and the slot that holds its result."""

    verb: str
    items: tuple[Item, ...]
    result: Key[R]
    given: tuple[Slot[Any], ...] = ()
    _ids: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        made: set[Key[Any]] = set(self.given)
        ids: list[str] = []
        for item in self.items:
            inner: Sequence[Step[Any]] = (*item.meanwhile, *item.steps) if isinstance(item, ApplianceSession) \
                else (item,)
            missing = [key_name(k) for k in item.needs if k not in made]
            if isinstance(item, ApplianceSession):
                ids += ["launch-appliance"]
            for step in inner:
                if isinstance(item, ApplianceSession) and step in item.steps:
                    made.add(APPLIANCE)  # the meanwhile steps run before it is up
                missing += [key_name(k) for k in step.needs if k not in made]
                made.add(step.key)
                ids.append(step.id)
            if isinstance(item, ApplianceSession):
                ids.append("close-appliance")
            if missing:
                raise TypeError(f"{self.verb}: {', '.join(missing)} needed before anything makes it")
        if self.result not in made:
            raise TypeError(f"{self.verb}: nothing makes the result {key_name(self.result)}")
        if len(set(ids)) != len(ids):
            raise TypeError(f"{self.verb}: step ids repeat: {ids}")
        object.__setattr__(self, "_ids", tuple(ids))

    @property
    def step_ids(self) -> tuple[str, ...]:
        """Every step id in the order the steps run (what ``--json`` progress reports)."""
        return self._ids

    def run(self, monitor: Monitor, **given: Any) -> R:
        """Run every step; *given* are the initial slots by name. Returns the result slot's value."""
        by_name = {slot.name: slot for slot in self.given}
        if set(given) != set(by_name):
            raise TypeError(f"{self.verb} is given {sorted(given)}, expects {sorted(by_name)}")
        with ExitStack() as stack:
            ctx = Context(monitor, stack)
            for name, value in given.items():
                ctx.put(by_name[name], value)
            for item in self.items:
                if isinstance(item, ApplianceSession):
                    run_interruptibly(functools.partial(_session, item, ctx))
                else:
                    _timed(item, ctx)
            return ctx[self.result]


def _timed(step: Step[Any], ctx: Context) -> None:
    with ctx.monitor.step(step.id, step.title):
        step.execute(ctx)


def _session(session: ApplianceSession, ctx: Context) -> None:
    with ExitStack() as appliance_stack:
        ctx.put(APPLIANCE, _launch(session, ctx, appliance_stack))
        for step in session.steps:
            _timed(step, ctx)
        with ctx.monitor.step("close-appliance", "closing the disk"):
            appliance_stack.close()  # the appliance's shutdown: a failed flush fails the run


def _launch(session: ApplianceSession, ctx: Context, stack: ExitStack) -> Appliance:
    """The appliance, started while the session's *meanwhile* steps run; it is closed with *stack*. When one of
    them fails the appliance is closed as soon as it is up, without waiting for it (a caller may fall back to
    another pipeline meanwhile)."""
    def start() -> tuple[ExitStack, Appliance]:
        with ExitStack() as own, ctx.monitor.step("launch-appliance", "starting the appliance"):
            app = own.enter_context(launch(session.drives(ctx), memory_mib=session.memory_mib))
            return own.pop_all(), app

    if not session.meanwhile:
        own, app = start()
        stack.enter_context(own)
        return app
    launched: list[tuple[ExitStack, Appliance]] = []
    failed: list[BaseException] = []

    def background() -> None:
        try:
            launched.append(start())
        except BaseException as exc:  # reported to the main thread below
            failed.append(exc)

    launcher = threading.Thread(target=background, name="imgconv-launch", daemon=True)
    launcher.start()
    try:
        for step in session.meanwhile:
            _timed(step, ctx)
    except BaseException:
        threading.Thread(target=_close_when_up, args=(launcher, launched), daemon=True).start()
        raise
    launcher.join()
    if failed:
        raise failed[0]
    stack.enter_context(launched[0][0])
    return launched[0][1]


def _close_when_up(launcher: threading.Thread, launched: list[tuple[ExitStack, Appliance]]) -> None:
    launcher.join()
    for own, _ in launched:
        own.close()


def run_interruptibly(work: Callable[[], T]) -> T:
    """Run *work* in a thread while this one stays free to receive SIGINT/SIGTERM; return its value.

    libguestfs calls block in C for minutes, and a signal handler only runs in the main thread between
    bytecodes. On interruption the worker is abandoned: libguestfs' recovery process kills the appliance
    when imgconv exits, and the run's exit stack removes the temporary files.
    """
    outcome: list[tuple[bool, Any]] = []

    def target() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as exc:
            outcome.append((False, exc))

    worker = threading.Thread(target=target, name="imgconv-worker", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]
