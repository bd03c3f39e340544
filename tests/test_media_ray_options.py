"""`harvest media --engine ray` without a cluster: its options refused in one line, an address
nobody answers or a missing ray in one line, and the CDN budget split between the workers."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import harvest, write_config
from crawler.archive.state import State
from crawler.config import MIN_REQUESTS_PER_SECOND, MediaConfig
from crawler.crawl.media_ray import worker_share
from crawler.errors import ExitCode


def _config(tmp_path: Path) -> Path:
    """A config whose output dir has a state (so `harvest media` gets as far as Ray)."""
    config = write_config(tmp_path / "c.toml", "http://127.0.0.1:9", [{"modelId": 1}])
    State.open(tmp_path / "out").close()
    return config


def _one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(("harvest: error: ", "harvest media: error: ")), stderr
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--address", "127.0.0.1:6379"], "--address"),
        (["--workers", "2"], "--workers"),
        (["--task-items", "2000"], "--task-items"),  # the default, given: still not an option here
        (["--engine", "local", "--workers", "2", "--task-items", "5"], "--workers"),
    ],
)
def test_ray_options_without_engine_ray_are_one_line(tmp_path: Path, flags: list[str], named: str) -> None:
    result = harvest("media", tmp_path / "absent.toml", *flags)
    assert result.code == ExitCode.USAGE
    assert _one_error_line(result.stderr) == (
        f"harvest media: error: {named} is an option of --engine ray (see harvest media --help)"
    )


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1"])
def test_an_address_nobody_answers_is_one_line(tmp_path: Path, address: str) -> None:
    # Refused at once on loopback: the harvest's own check answers, not Ray's minutes of retries.
    result = harvest("media", _config(tmp_path), "--engine", "ray", "--address", address, timeout=60)
    assert result.code == ExitCode.ERROR
    line = _one_error_line(result.stderr)
    assert f"cannot reach the Ray cluster at {address}" in line


def test_ray_not_installed_is_one_line(tmp_path: Path) -> None:
    hidden = tmp_path / "hide-ray"
    (hidden / "ray").mkdir(parents=True)  # found before site-packages: `import ray` fails
    (hidden / "ray" / "__init__.py").write_text('raise ImportError("no module named ray (hidden)")\n')
    result = harvest("media", _config(tmp_path), "--engine", "ray", env={"PYTHONPATH": str(hidden)})
    assert result.code == ExitCode.ERROR
    assert "needs the ray extra: pip install 'civitai-harvest[ray]'" in _one_error_line(result.stderr)


@given(
    rate=st.floats(min_value=MIN_REQUESTS_PER_SECOND, max_value=10_000, allow_nan=False),
    concurrency=st.integers(min_value=1, max_value=256),
    workers=st.integers(min_value=1, max_value=1000),
)
def test_the_workers_shares_never_add_up_to_more_than_the_cdn_budget(
    rate: float, concurrency: int, workers: int
) -> None:
    media = MediaConfig(Path("media"), requests_per_second=rate, concurrency=concurrency)
    at_once, share = worker_share(media, workers)
    assert 1 <= at_once <= workers and share.concurrency >= 1  # every task can download
    assert at_once * share.concurrency <= concurrency
    assert Fraction(share.requests_per_second) * at_once <= Fraction(rate)  # exactly, not to a float
    assert share.requests_per_second > 0
    assert share.types == media.types and share.timeout == media.timeout  # the rest is as configured


def test_a_share_is_the_whole_budget_split_evenly() -> None:
    media = MediaConfig(Path("media"), requests_per_second=10.0, concurrency=8)
    assert worker_share(media, 2)[1].concurrency == 4
    assert worker_share(media, 3)[1].concurrency == 2  # 3 x 2 <= 8, where rounding up made 3 x 3
    at_once, share = worker_share(media, 16)  # more workers than downloads: one download each
    assert (at_once, share.concurrency, share.requests_per_second) == (8, 1, 10.0 / 8)
