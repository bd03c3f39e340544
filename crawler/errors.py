"""One exception root for everything the harvester can say went wrong.

Each family names whose fault it is and carries the exit status the CLI uses, so
`cli.main` turns any `HarvestError` into one line on stderr and that status. An
error raised for an answer carries that answer's outcome (status, reason, tag);
an error that stopped a shard carries the shard's key.
"""

from __future__ import annotations

import enum
from typing import Protocol


class ExitCode(enum.IntEnum):
    """Process exit statuses, documented in the README and `harvest --help`."""

    OK = 0
    ERROR = 1  # the run cannot go on: key rejected, region blocked, disk or state broken
    USAGE = 2  # bad config or command line: nothing was requested
    SHARDS_FAILED = 3  # some shards stopped; a rerun resumes them
    LOCKED = 4  # another harvest holds the output dir
    SIGINT = 130
    SIGTERM = 143


class Answer(Protocol):
    """What an error keeps of the answer that caused it (`crawler.http.outcomes.Outcome`)."""

    @property
    def status(self) -> int | None: ...
    @property
    def reason(self) -> str: ...
    @property
    def key(self) -> str: ...


class HarvestError(Exception):
    """Base of every error the CLI reports as one clean line."""

    exit_code: int = ExitCode.ERROR

    def __init__(self, message: str, *, outcome: Answer | None = None, shard: str | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome  # the answer that caused it, when one did
        self.shard = shard  # the key of the shard it stopped, when it stopped one


class ConfigError(HarvestError):
    """The config file or command line is wrong: the user's to fix."""

    exit_code = ExitCode.USAGE


class StateError(HarvestError):
    """The output dir's state or files are inconsistent or unusable."""

    exit_code = ExitCode.ERROR


class DisagreementError(StateError):
    """The segment files are not what the state says they hold (a lost or older state, a
    file deleted or cut outside the harvest); `harvest repair` rebuilds the state from them."""


class OutputError(HarvestError):
    """Writing the harvest failed (disk full, permissions)."""

    exit_code = ExitCode.ERROR


class StoreError(HarvestError):
    """The object store (`[output] publish`) refused or failed an operation; what was
    committed locally is intact and a rerun publishes what is missing."""

    exit_code = ExitCode.ERROR


class LockedError(HarvestError):
    """Another harvest is running on the same output dir."""

    exit_code = ExitCode.LOCKED


class ApiError(HarvestError):
    """The API answered something the harvester cannot go on from."""

    exit_code = ExitCode.SHARDS_FAILED


class ShardError(ApiError):
    """Fatal for one shard only: other shards go on, the run exits 3."""


class CursorLoopError(ShardError):
    """The API served a cursor this walk had already followed."""


class NoProgressError(ShardError):
    """The API keeps serving cursors, but no image this walk has not seen already."""


class ForeignItemsError(ShardError):
    """The API served items that do not match the shard's key."""


class CursorGoneError(ShardError):
    """The server no longer continues a cursor (expired, other filters): walk again from the head."""


class OddItemError(ShardError):
    """The API served an item the archive cannot hold (an id beyond 63 bits)."""


class BadRequestError(ShardError):
    """A 400: the API rejected a parameter (named in the message)."""


class NotFoundError(ShardError):
    """A 404: the model (or path) does not exist."""


class RetriesExhaustedError(ShardError):
    """Transient failures outlasted the retry budget; the checkpoint is intact."""


class SearchTimeoutError(RetriesExhaustedError):
    """The shard's requests keep timing out: a smaller page or a split may help."""


class RunFatalError(ApiError):
    """Fatal for the whole run: rejected key (401/403), blocked region (451).

    A rerun cannot help until the cause is fixed, so this is not exit 3.
    """

    exit_code = ExitCode.ERROR
