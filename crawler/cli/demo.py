"""`harvest demo`: the whole harvest against the bundled fake API, with no internet."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from crawler.archive.media_ledger import MediaLedger
from crawler.cli.report import print_status
from crawler.config import Config, load_config
from crawler.errors import ConfigError
from crawler.testing.fakeapi import Dataset, ServerThread, default_spec

_CONFIG = """\
# Written by `harvest demo`: model 827184 of the bundled fake API on {base_url}.
[api]
base_url = "{base_url}"
requests_per_second = 20
concurrency = "auto"

[output]
dir = "data"

[[queries]]
name = "demo-model-827184"
modelId = 827184
sort = "Newest"
browsingLevel = 31
withMeta = true
"""


def run_demo(where: Path, run: Callable[[Config, str | None], int]) -> int:
    """Serve the fake API on 127.0.0.1, write a config into `where` and harvest it."""
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot create the demo dir: {exc.strerror}") from None
    with ServerThread(Dataset(default_spec())) as api:
        path = where / "demo.toml"
        path.write_text(_CONFIG.format(base_url=api.base_url))
        config = load_config(path)
        print(f"demo: fake Civitai API on {api.base_url}; config {path}", file=sys.stderr)
        code = run(config, None)
    state = MediaLedger.open(config.output.dir, create=False)
    try:
        print_status(state, config)
    finally:
        state.close()
    print(
        f"demo: the images are in {config.output.dir}/images-*.ndjson, one JSON object a line",
        file=sys.stderr,
    )
    return code
