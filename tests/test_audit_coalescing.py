"""Which high-volume reads get their own audit row (pacs.audit.ReadCoalescer): pure logic."""

from __future__ import annotations

from pacs.audit import ReadCoalescer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_first_read_is_recorded_and_repeats_within_the_window_are_covered() -> None:
    clock = Clock()
    coalescer = ReadCoalescer(60, clock=clock)
    assert coalescer.should_record("dr.lan", "dicomweb.frames", "1.2.3")
    assert not coalescer.should_record("dr.lan", "dicomweb.frames", "1.2.3")
    clock.now += 59.9
    assert not coalescer.should_record("dr.lan", "dicomweb.frames", "1.2.3")
    clock.now += 0.2
    assert coalescer.should_record("dr.lan", "dicomweb.frames", "1.2.3")  # a new window, a new row


def test_another_study_action_or_principal_gets_its_own_row() -> None:
    coalescer = ReadCoalescer(60, clock=Clock())
    assert coalescer.should_record("dr.lan", "dicomweb.frames", "1.2.3")
    assert coalescer.should_record("dr.lan", "dicomweb.frames", "1.2.4")
    assert coalescer.should_record("dr.lan", "dicomweb.rendered", "1.2.3")
    assert coalescer.should_record("dr.minh", "dicomweb.frames", "1.2.3")


def test_zero_window_records_every_read_and_memory_stays_bounded() -> None:
    every = ReadCoalescer(0, clock=Clock())
    assert all(every.should_record("a", "dicomweb.frames", "1.2.3") for _ in range(5))
    clock = Clock()
    bounded = ReadCoalescer(60, max_keys=100, clock=clock)
    for n in range(1000):
        assert bounded.should_record("a", "dicomweb.frames", f"1.2.{n}")
    assert len(bounded._seen) <= 100
