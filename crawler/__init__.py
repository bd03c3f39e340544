"""civitai-harvest: exactly-once, resumable bulk harvester for Civitai's images API.

The public surface is small: load a config, run it, read its state. Everything
else lives in modules named for one concept each.
"""

from crawler.archive.state import State
from crawler.config import Config, load_config
from crawler.crawl.pipeline import RunSummary, run_harvest
from crawler.errors import HarvestError

__all__ = ["Config", "HarvestError", "RunSummary", "State", "load_config", "run_harvest"]
__version__ = "0.1.0"
