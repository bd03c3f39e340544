"""The command line itself: `--version`, the flags every subcommand takes, the options value."""

from __future__ import annotations

import dataclasses
import importlib.metadata
from pathlib import Path

import orjson
import pytest

import crawler
from conftest import harvest, write_config
from crawler.cli import app as cli
from crawler.cli.logs import DEFAULT_PROGRESS_EVERY, LogOptions
from crawler.testing.fakeapi import FakeServer

QUERY = {"modelVersionId": 5003, "browsingLevel": 31}


def test_version_has_one_source() -> None:
    result = harvest("--version")
    assert result.code == 0 and result.stdout == f"harvest {crawler.__version__}\n"
    assert importlib.metadata.version("civitai-harvest") == crawler.__version__  # pyproject reads it


@pytest.mark.parametrize("command", ["status", "verify"])
def test_status_and_verify_take_the_common_flags(tmp_path: Path, api: FakeServer, command: str) -> None:
    cfg = write_config(tmp_path / "c.toml", api.base_url, [QUERY])
    missing = harvest(command, cfg, "--log-format", "json")  # no state yet: an error, as a JSON record
    assert missing.code == 1
    (record,) = [orjson.loads(line) for line in missing.stderr.splitlines()]
    assert record["level"] == "ERROR" and record["msg"].startswith("harvest: error: ")
    assert harvest("run", cfg, "-q").code == 0
    for flags in (["-v"], ["-q"], ["--log-format", "json"], ["--log-format", "text", "-q"]):
        result = harvest(command, cfg, *flags)
        assert result.code == 0 and result.stdout and not result.stderr, (flags, result)
    assert harvest(command, cfg, "-v", "-q").code == 2  # one or the other
    assert harvest(command, cfg, "--progress-every", "5").code == 2  # nothing runs: no progress


def test_log_options_are_one_frozen_value_per_parse() -> None:
    parse = cli.build_parser().parse_args
    json_quiet = cli.log_options(parse(["run", "x.toml", "--log-format", "json", "-q"]))
    assert json_quiet == LogOptions(log_format="json", quiet=True)
    assert cli.log_options(parse(["demo", "--progress-every", "2", "-v"])) == LogOptions(
        verbose=True, progress_every=2
    )
    assert cli.log_options(parse(["run", "x.toml"])).progress_every == DEFAULT_PROGRESS_EVERY
    assert cli.log_options(parse(["verify", "x.toml"])) == LogOptions(progress_every=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        json_quiet.quiet = False  # type: ignore[misc]


@pytest.mark.parametrize(
    ("args", "prog", "culprit"),
    [
        (
            ["export", "c.toml", "--format", "csv"],
            "harvest export",
            "argument --format: invalid choice: 'csv'",
        ),
        (["refresh", "c.toml", "--older-than", "7days"], "harvest refresh", "'7days' is not a duration"),
        (["sql", "c.toml", "SELECT 1", "--format", "xml"], "harvest sql", "argument --format"),
        (["run", "c.toml", "--progress-every", "-1"], "harvest run", "argument --progress-every"),
        (["media", "c.toml", "--workers", "2"], "harvest media", "--workers is an option of --engine ray"),
        (["status", "c.toml", "-v", "-q"], "harvest status", "not allowed with argument -v/--verbose"),
        (["verify"], "harvest verify", "the following arguments are required: config"),
        (["export", "c.toml", "--bogus"], "harvest export", "unrecognized arguments: --bogus"),
        (["demo", "--dir"], "harvest demo", "argument --dir: expected one argument"),
        (["fetch", "c.toml"], "harvest", "invalid choice: 'fetch'"),
        ([], "harvest", "the following arguments are required: COMMAND"),
    ],
)
def test_a_bad_command_line_is_one_line_naming_the_culprit(args: list[str], prog: str, culprit: str) -> None:
    result = harvest(*args)
    assert result.code == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()  # no usage block before it
    assert line.startswith(f"{prog}: error: ") and culprit in line, line
    assert line.endswith(f"(see {prog} --help)"), line
