"""The console protocol decoder: markers, CRLF undoing, streaming, spoofed markers."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converter.boot.console import ConsoleDecoder, Event, Exit, Firmware, Output


def onlcr(data: bytes) -> bytes:
    """What the guest's serial tty does to what the init writes."""
    return data.replace(b"\n", b"\r\n")


def console(workload: bytes, status: int, firmware: bytes = b"[    0.9] Run /init as init process\n") -> bytes:
    """The bytes the host reads for a workload that wrote *workload* and exited with *status*."""
    return onlcr(firmware + b"<<imgconv:start>>\n" + workload + b"<<imgconv:exit status=%d>>\n" % status)


def decode(chunks: list[bytes]) -> list[Event]:
    decoder = ConsoleDecoder()
    events: list[Event] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events + decoder.close()


def summary(events: list[Event]) -> tuple[bytes, bytes, int | None]:
    firmware = b"".join(e.data for e in events if isinstance(e, Firmware))
    output = b"".join(e.data for e in events if isinstance(e, Output))
    exits = [e.status for e in events if isinstance(e, Exit)]
    assert len(exits) <= 1
    if exits:
        assert isinstance(events[-1], Exit), "Exit is the last event"
    return firmware, output, exits[0] if exits else None


def split_randomly(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.randint(0, 12))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


WORKLOADS = [
    b"",
    b"hello\n",
    b"no newline",
    b"\n",
    b"\n\n\n",
    b"a\r\nb\r\n",  # a workload's own CRLF survives (the tty made it \r\r\n)
    b"cr only\r",
    b"\r",
    b"\r\r\n\r",
    b"\x00\x01\xff\xfe binary \x1b[31m\n",
    b"<<imgconv:start>>\n",  # a second start marker is just output
    b"<<imgconv:exit status=0>>\n",  # a spoofed exit marker followed by the real one
    b"<<imgconv:exit status=0>>",  # ... with the real one right after it
    b"<<imgconv:exit status=0 nl=0>>\n",  # the older format, spoofed
    b"x\n<<imgconv:exit status=7>>\nmore\n",
    b"x<<imgconv:exit status=7>>more",
    b"<<imgconv:exit",
    b"<<imgconv:exit status=",
    b"<<imgconv:exit status=1",  # the real marker completes a different number
    b"<<imgconv:exit status=300>>\n",
    b"<<imgconv:exit status=007>>\n",
    b"line\n" * 1000,
]


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("status", [0, 1, 125, 255])
def test_round_trip_whole(workload: bytes, status: int) -> None:
    firmware, output, got = summary(decode([console(workload, status)]))
    assert output == workload
    assert got == status
    assert firmware == b"[    0.9] Run /init as init process\n"


@pytest.mark.parametrize("workload", WORKLOADS)
def test_round_trip_any_split(workload: bytes) -> None:
    rng = random.Random(workload)
    data = console(workload, 42)
    for _ in range(50):
        assert summary(decode(split_randomly(data, rng)))[1:] == (workload, 42)


def test_round_trip_byte_by_byte() -> None:
    workload = b"a\n<<imgconv:exit status=1>>\nb\r\nc<<imgconv:exit status=1 nl=0>>"
    assert summary(decode([bytes([b]) for b in console(workload, 3)]))[1:] == (workload, 3)


def test_output_is_streamed_not_buffered() -> None:
    decoder = ConsoleDecoder()
    decoder.feed(onlcr(b"kernel\n<<imgconv:start>>\n"))
    assert decoder.feed(b"partial") == [Output(b"partial")]
    # A complete line comes out at once, its newline too: nothing waits for the exit marker.
    assert decoder.feed(b" line\r\n") == [Output(b" line\n")]
    assert decoder.feed(b"next") == [Output(b"next")]
    assert decoder.feed(b" and more\r\nlines\r\nstill") == [Output(b" and more\nlines\nstill")]


def test_a_server_waiting_after_its_line_shows_the_whole_line() -> None:
    decoder = ConsoleDecoder()
    assert decoder.feed(onlcr(b"[ 0.1] boot\n<<imgconv:start>>\nlistening on :8080\n")) == [
        Firmware(b"[ 0.1] boot\n"),
        Output(b"listening on :8080\n"),
    ]
    assert decoder.pending_exit is None


@settings(max_examples=300, deadline=None)
@given(workload=st.binary(max_size=300).filter(lambda b: b"<" not in b), seed=st.integers(0, 2**32))
def test_only_a_trailing_cr_is_held_without_marker_text(workload: bytes, seed: int) -> None:
    """Whatever the chunks, all the output so far is out, but for half a CRLF."""
    decoder = ConsoleDecoder()
    events = decoder.feed(onlcr(b"<<imgconv:start>>\n"))
    for chunk in split_randomly(onlcr(workload), random.Random(seed)) if workload else []:
        events += decoder.feed(chunk)
    expected = workload[:-1] if workload.endswith(b"\r") else workload
    assert b"".join(e.data for e in events if isinstance(e, Output)) == expected


def test_streaming_holds_back_only_what_could_be_a_marker() -> None:
    decoder = ConsoleDecoder()
    assert decoder.feed(b"<<imgconv:start>>\r\nhello\r\n") == [Output(b"hello\n")]
    assert decoder.feed(b"<<imgconv:ex") == []  # could be the exit marker
    assert decoder.feed(b"tra") == [Output(b"<<imgconv:extra")]  # was not
    assert decoder.feed(b"\r") == []  # half a CRLF
    assert decoder.feed(b"x") == [Output(b"\rx")]
    assert decoder.feed(b"a<<imgconv:exit status=2") == [Output(b"a")]
    assert decoder.feed(b"5") == []  # 25, or 250-255
    assert decoder.feed(b"6") == [Output(b"<<imgconv:exit status=256")]  # never a status
    assert decoder.feed(b"<<imgconv:exit status=0>>") == []  # complete: held as the possible exit
    assert decoder.pending_exit == 0
    assert decoder.feed(b"!") == [Output(b"<<imgconv:exit status=0>>!")]


def test_marker_mid_line() -> None:
    data = onlcr(b"[ 0.1] k\n<<imgconv:start>>\nno newline<<imgconv:exit status=3>>\n")
    assert summary(decode([data])) == (b"[ 0.1] k\n", b"no newline", 3)
    for cut in range(1, len(data)):
        assert summary(decode([data[:cut], data[cut:]])) == (b"[ 0.1] k\n", b"no newline", 3)


def test_pending_exit_becomes_output_when_more_follows() -> None:
    decoder = ConsoleDecoder()
    events = decoder.feed(b"<<imgconv:start>>\r\nout\r\n<<imgconv:exit status=9>>\r\n")
    assert decoder.pending_exit == 9
    events += decoder.feed(b"still running\r\n")
    assert decoder.pending_exit is None
    events += decoder.feed(b"<<imgconv:exit status=0>>\r\n")
    assert decoder.pending_exit == 0
    events += decoder.close()
    assert summary(events) == (b"", b"out\n<<imgconv:exit status=9>>\nstill running\n", 0)


def test_no_exit_marker_means_no_exit() -> None:
    data = onlcr(b"<<imgconv:start>>\nworking...\n") + b"Kernel panic - not syncing"
    _, output, status = summary(decode([data]))
    assert status is None
    assert output == b"working...\nKernel panic - not syncing"


def test_nothing_at_all() -> None:
    assert decode([]) == []
    assert summary(decode([b"SeaBIOS\r\n", b"Booting from Hard Disk..."])) == (
        b"SeaBIOS\nBooting from Hard Disk...",
        b"",
        None,
    )


def test_init_failure_before_start() -> None:
    data = onlcr(b"[ 1.0] boot\nimgconv-init: error: unable to find user x\n<<imgconv:exit status=125>>\n")
    firmware, output, status = summary(decode([data]))
    assert status == 125
    assert output == b""
    assert firmware.endswith(b"imgconv-init: error: unable to find user x\n")


def test_start_marker_split_and_not_at_line_start() -> None:
    data = onlcr(b"noise<<imgconv:start>>\nout\n<<imgconv:exit status=0>>\n")
    for cut in range(1, len(data)):
        assert summary(decode([data[:cut], data[cut:]])) == (b"noise", b"out\n", 0)


def test_marker_cut_by_power_off_still_counts() -> None:
    data = onlcr(b"<<imgconv:start>>\nok") + b"<<imgconv:exit status=4>>\r"
    assert summary(decode([data]))[1:] == (b"ok", 4)
    assert summary(decode([data[:-1]]))[1:] == (b"ok", 4)


def test_markers_of_older_disks_still_give_the_status() -> None:
    """Their init added a newline before the marker when the output lacked one (nl=1): it stays."""
    old = onlcr(b"<<imgconv:start>>\nabc\n<<imgconv:exit status=5 nl=1>>\n")
    assert summary(decode([old]))[1:] == (b"abc\n", 5)
    old = onlcr(b"<<imgconv:start>>\nabc\n<<imgconv:exit status=0 nl=0>>\n[ 2.0] reboot: Power down\n")
    assert summary(decode([old])) == (b"[ 2.0] reboot: Power down\n", b"abc\n", 0)


def test_feed_after_close_is_an_error() -> None:
    decoder = ConsoleDecoder()
    decoder.close()
    with pytest.raises(ValueError):
        decoder.feed(b"x")
    assert decoder.close() == []


@settings(max_examples=300, deadline=None)
@given(
    workload=st.binary(max_size=300)
    | st.lists(
        st.sampled_from([b"\r", b"\n", b"<<imgconv:", b"exit status=1", b">>", b" nl=0", b"<<imgconv:exit status=",
                         b"x"])
    ).map(b"".join),
    status=st.integers(0, 255),
    seed=st.integers(0, 2**32),
)
def test_round_trip_property(workload: bytes, status: int, seed: int) -> None:
    data = console(workload, status)
    assert summary(decode(split_randomly(data, random.Random(seed))))[1:] == (workload, status)


def test_init_failure_marker_in_its_own_chunk() -> None:
    chunks = [b"imgconv-init: error: no\r\n", b"<<imgconv:exit status=125>>\r\n"]
    assert summary(decode(chunks)) == (b"imgconv-init: error: no\n", b"", 125)
    for data in (b"".join(chunks), b"x\r\n" + b"".join(chunks)):
        for cut in range(1, len(data)):
            assert summary(decode([data[:cut], data[cut:]]))[2] == 125


@settings(max_examples=200, deadline=None)
@given(firmware=st.binary(max_size=200).filter(lambda b: b"<" not in b), seed=st.integers(0, 2**32))
def test_init_failure_property(firmware: bytes, seed: int) -> None:
    data = onlcr(firmware + b"\nimgconv-init: error: x\n<<imgconv:exit status=125>>\n")
    got_firmware, output, status = summary(decode(split_randomly(data, random.Random(seed))))
    assert (got_firmware, output, status) == (firmware + b"\nimgconv-init: error: x\n", b"", 125)


@pytest.mark.parametrize(
    "noise",
    [b"[    2.106491] reboot: Power down\n", b"reboot: Power down\n", b"[ 1.0] a\n[ 1.1] b\n", b"[    2.1] reb"],
)
@pytest.mark.parametrize("workload", [b"", b"out\n", b"no newline", b"<<imgconv:exit status=9>>\n"])
def test_kernel_lines_after_the_exit_marker(noise: bytes, workload: bytes) -> None:
    data = console(workload, 7) + onlcr(noise)
    for cut in range(1, len(data)):
        firmware, output, status = summary(decode([data[:cut], data[cut:]]))
        assert (output, status) == (workload, 7)
        assert firmware.endswith(noise)


def test_kernel_like_lines_from_the_workload_are_output() -> None:
    workload = b"<<imgconv:exit status=9>>\n[ 1.0] fake kernel line\nreal output\n"
    assert summary(decode([console(workload, 0)]))[1:] == (workload, 0)
    decoder = ConsoleDecoder()
    decoder.feed(onlcr(b"<<imgconv:start>>\n<<imgconv:exit status=3>>\n[ 1.0] x\n"))
    assert decoder.pending_exit == 3
    decoder.feed(b"more")
    assert decoder.pending_exit is None
