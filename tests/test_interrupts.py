"""SIGINT and SIGTERM during the start of `harvest run`, before its event loop (cli/interrupts.py).

The run is driven in this process, and the signal is sent from inside the step it
should interrupt (taking the lock, opening the state), so it lands exactly there.
The loop's own construction holds a signal until the harvest would begin.
Signals during the harvest itself are tested through the real CLI (test_crash_resume).
"""

from __future__ import annotations

import gc
import os
import selectors
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import write_config
from crawler.archive.lock import OutputLock
from crawler.archive.state import State
from crawler.cli import run
from crawler.config import load_config
from crawler.crawl.watch import NoProgress


@pytest.fixture
def process_state() -> Iterator[None]:
    """`cmd_run` keeps its signal handlers for the rest of the process and tunes the collector."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    thresholds = gc.get_threshold()
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def _signalling(real: Callable[..., Any], sig: int) -> Callable[..., Any]:
    def step(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), sig)  # handled at the next instruction: inside this step
        return real(*args, **kwargs)

    return step


@pytest.mark.usefixtures("process_state")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
@pytest.mark.parametrize("step", ["taking the lock", "opening the state", "building the loop"])
def test_a_signal_during_start_up_is_one_line_and_its_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], sig: int, step: str
) -> None:
    cfg = load_config(write_config(tmp_path / "c.toml", "http://127.0.0.1:9/api/v1", [{"modelVersionId": 1}]))
    if step == "taking the lock":
        monkeypatch.setattr(run, "OutputLock", _signalling(OutputLock, sig))
    elif step == "opening the state":
        monkeypatch.setattr(State, "open", staticmethod(_signalling(State.open, sig)))
    else:  # inside the event loop's constructor: a half-built loop would print a traceback when collected
        monkeypatch.setattr(selectors, "DefaultSelector", _signalling(selectors.DefaultSelector, sig))
    code = run.cmd_run(cfg, None, NoProgress())
    gc.collect()  # a half-built loop's complaint, if any, is printed now (and fails the test)
    err = capsys.readouterr().err
    name = signal.Signals(sig).name
    assert code == 128 + sig
    assert err.splitlines() == [
        f"harvest: interrupted by {name}; committed work is kept. Resume with: harvest run {cfg.path}"
    ]
    summary = cfg.output.dir / "last-run.json"
    if step == "taking the lock":  # the dir was not ours yet: nothing written into it
        assert not summary.exists()
    else:
        assert orjson.loads(summary.read_bytes())["exit_code"] == 128 + sig
