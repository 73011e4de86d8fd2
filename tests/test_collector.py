"""Tests of :mod:`thodb.collector`: the cyclic garbage collector is paused for a block
and resumed as it was, whatever the block does and however many run at once."""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from thodb import collector
from thodb.errors import LoadError
from thodb.expand import expand
from thodb.load import load

URL = "http://example.org/ValueSet/collector"


@pytest.fixture(autouse=True)
def _collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_paused_turns_the_collector_off_and_back_on() -> None:
    with collector.paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_nested_blocks_resume_when_the_outer_one_ends() -> None:
    with collector.paused():
        with collector.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_turned_off_before_stays_off() -> None:
    gc.disable()
    with collector.paused():
        pass
    assert not gc.isenabled()


def test_an_exception_in_the_block_resumes_the_collector() -> None:
    with pytest.raises(ValueError), collector.paused():
        raise ValueError("stop")
    assert gc.isenabled()


def test_blocks_in_two_threads_resume_after_the_last_one() -> None:
    first_in = threading.Event()
    second_done = threading.Event()
    seen: list[bool] = []

    def first() -> None:
        with collector.paused():
            first_in.set()
            second_done.wait(timeout=10)
            seen.append(gc.isenabled())  # the second block has ended: still off

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(timeout=10)
    with collector.paused():
        pass
    second_done.set()
    thread.join(timeout=10)
    assert seen == [False]
    assert gc.isenabled()


def test_load_and_expand_leave_the_collector_on(
    fresh_engine: Engine, tmp_path: Path
) -> None:
    codes = ["a", "b", "c"]
    (tmp_path / "vs.json").write_text(
        json.dumps(
            {
                "resourceType": "ValueSet",
                "url": URL,
                "status": "active",
                "compose": {
                    "include": [
                        {
                            "system": "http://example.org/cs",
                            "concept": [{"code": code} for code in codes],
                        }
                    ]
                },
            }
        )
    )
    load(fresh_engine, [tmp_path])
    assert gc.isenabled()
    with Session(fresh_engine) as session:
        expansion = expand(session, URL, cache=False)
    assert [member.code for member in expansion.contains] == codes
    assert gc.isenabled()


def test_a_refused_load_leaves_the_collector_on(
    fresh_engine: Engine, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"resourceType": "ValueSet", "status": 3}))
    with pytest.raises(LoadError):
        load(fresh_engine, [bad])
    assert gc.isenabled()
