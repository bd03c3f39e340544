"""A deterministic synthetic image index for the fake Civitai API.

Only a few compact integer columns are stored per image (about 25 bytes), so a
million images fit in tens of megabytes; everything else an item carries (url,
stats, meta, tags...) is derived on demand from a hash of its id and the seed.
"""

from __future__ import annotations

import bisect
import itertools
import random
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

LEVELS = (1, 2, 4, 8, 16)  # browsingLevel bits, one per item
LEVEL_NAMES = ("None", "Soft", "Mature", "X", "X")  # deprecated nsfwLevel strings
TYPES = ("image", "video", "audio")
SORTS = ("Most Reactions", "Most Comments", "Most Collected", "Newest", "Oldest", "Random")
PERIODS = ("Day", "Week", "Month", "Year", "AllTime")
PERIOD_MS = {"Day": 86_400_000, "Week": 7 * 86_400_000, "Month": 30 * 86_400_000, "Year": 365 * 86_400_000}

_FIRST_USER_ID = 1000
_HIDDEN, _DELETED = 1, 2  # bits of the per-image flags column
_M64 = (1 << 64) - 1
_T0_MS = 1_672_531_200_000  # 2023-01-01: the oldest image
_SPAN_MS = 3 * 365 * 86_400_000  # the initial images span about three years


def mix64(x: int) -> int:
    """splitmix64 finaliser: cheap, well-spread bits from an int."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


# ---------------------------------------------------------------- spec


@dataclass(frozen=True)
class VersionSpec:
    id: int
    images: int
    name: str = ""
    base_model: str = "SDXL 1.0"
    published: bool = True  # False: left out of GET /models/{id}, images still served

    @classmethod
    def from_obj(cls, obj: Any) -> VersionSpec:
        if isinstance(obj, (list, tuple)):  # shorthand [id, images]
            return cls(id=int(obj[0]), images=int(obj[1]))
        return cls(
            id=int(obj["id"]),
            images=int(obj.get("images", 0)),
            name=str(obj.get("name", "")),
            base_model=str(obj.get("baseModel", obj.get("base_model", "SDXL 1.0"))),
            published=bool(obj.get("published", True)),
        )


@dataclass(frozen=True)
class ModelSpec:
    id: int
    versions: tuple[VersionSpec, ...]
    name: str = ""
    type: str = "Checkpoint"

    @classmethod
    def from_obj(cls, model_id: int, obj: Any) -> ModelSpec:
        if isinstance(obj, Mapping) and "skewed" in obj:  # {"skewed": {"total": 60000, "n": 12, ...}}
            sk = obj["skewed"]
            skewed = skewed_versions(
                int(sk["total"]),
                int(sk["n"]),
                float(sk.get("share_of_first", 1 / 3)),
                first_id=int(sk.get("first_id", 1)),
            )
            return cls(int(model_id), skewed, str(obj.get("name", "")), str(obj.get("type", "Checkpoint")))
        if isinstance(obj, Mapping):
            versions, name, mtype = (
                obj["versions"],
                str(obj.get("name", "")),
                str(obj.get("type", "Checkpoint")),
            )
        else:  # a bare list of versions
            versions, name, mtype = obj, "", "Checkpoint"
        return cls(int(model_id), tuple(VersionSpec.from_obj(v) for v in versions), name, mtype)


def skewed_versions(
    total: int, n: int, share_of_first: float = 1 / 3, *, first_id: int = 1
) -> tuple[VersionSpec, ...]:
    """n versions (ids first_id, first_id+1, ...) holding `total` images between them, very unevenly.

    The first holds `share_of_first` of them; the rest share what is left by Zipf's law (the
    k-th of them in proportion to 1/k), so one version dwarfs the next and the last hold a
    handful: what a popular model looks like, for benchmarks that must balance shards. Every
    version holds at least one image when total >= n. In a JSON spec, a model may say
    {"skewed": {"total": 60000, "n": 12, "share_of_first": 0.33, "first_id": 1}} instead of
    listing its versions.
    """
    if n < 1 or total < 0 or not 0 < share_of_first <= 1:
        raise ValueError("skewed_versions needs n >= 1, total >= 0 and 0 < share_of_first <= 1")
    if n == 1:
        counts = [total]
    else:
        floor = 1 if total >= n else 0
        first = max(min(round(total * share_of_first), total - floor * (n - 1)), floor)
        weights = [1 / k for k in range(1, n)]
        rest = total - first - floor * (n - 1)
        exact = [rest * w / sum(weights) for w in weights]
        shares = [int(x) for x in exact]
        by_remainder = sorted(range(n - 1), key=lambda k: exact[k] - shares[k], reverse=True)
        for k in by_remainder[: rest - sum(shares)]:  # largest remainders: the sum is exact
            shares[k] += 1
        counts = [first, *(floor + s for s in shares)]
    return tuple(VersionSpec(id=first_id + k, images=c, name=f"v{k + 1}") for k, c in enumerate(counts))


@dataclass(frozen=True)
class DatasetSpec:
    seed: int = 0
    models: tuple[ModelSpec, ...] = ()
    overlap: float = 0.1  # fraction of images that also belong to another version of their model
    posts: int = 50
    users: int = 20
    hidden_rate: float = 0.02  # fraction of rows filtered after the search (served as gaps)
    legacy_timeout_rows: int = 20_000  # legacy modelId queries over this go silently empty
    first_image_id: int = 10_000_000
    first_post_id: int = 100_000
    level_weights: tuple[float, ...] = (50, 20, 15, 10, 5)  # how images spread over PG ... XXX
    type_weights: tuple[float, ...] = (85, 13, 2)  # ... and over image, video, audio

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetSpec:
        """Build from plain JSON; `models` maps model id -> versions (or is a list of models)."""
        raw = d.get("models", {})
        if isinstance(raw, Mapping):
            models = tuple(ModelSpec.from_obj(int(k), v) for k, v in raw.items())
        else:
            models = tuple(ModelSpec.from_obj(int(m["id"]), m) for m in raw)
        known = {f for f in cls.__dataclass_fields__ if f not in ("models",)}
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known
        }
        return cls(models=models, **values)

    @property
    def total_images(self) -> int:
        return sum(v.images for m in self.models for v in m.versions)


def default_spec() -> DatasetSpec:
    """Model 827184 with five versions of a few hundred images each: the CLI default."""
    return DatasetSpec.from_dict(
        {
            "seed": 827184,
            "models": {
                "827184": {
                    "name": "Pony Realism",
                    "type": "Checkpoint",
                    "versions": [
                        {"id": 1920896, "images": 420, "name": "v2.2", "baseModel": "Pony"},
                        {"id": 1720374, "images": 380, "name": "v2.1", "baseModel": "Pony"},
                        {"id": 1481542, "images": 300, "name": "v2.0", "baseModel": "Pony"},
                        {"id": 1254211, "images": 260, "name": "v1.5", "baseModel": "Pony"},
                        {
                            "id": 925000,
                            "images": 150,
                            "name": "v1.0 (withdrawn)",
                            "baseModel": "Pony",
                            "published": False,
                        },
                    ],
                },
            },
            "overlap": 0.15,
            "posts": 12,
            "users": 6,
            "hidden_rate": 0.03,
            "legacy_timeout_rows": 1000,
        }
    )


# ---------------------------------------------------------------- queries


@dataclass(frozen=True)
class ImageQuery:
    """The filter and sort of an /images request: the cache key of a selection."""

    post_id: int | None = None
    model_id: int | None = None
    model_version_id: int | None = None
    image_id: int | None = None
    username: str | None = None  # lower-cased
    user_id: int | None = None
    period: str = "AllTime"
    sort: str = "Most Reactions"
    levels: int = 31
    tags: frozenset[int] = frozenset()
    type: str | None = None
    base_models: frozenset[str] = frozenset()
    ids: frozenset[int] = frozenset()  # ids=1,2,3: only these images (the legacy database path)


@dataclass(frozen=True)
class Stats:
    cry: int
    laugh: int
    like: int
    dislike: int
    heart: int
    comment: int
    collected: int  # not in the item, only a sort key

    @property
    def reactions(self) -> int:
        return self.cry + self.laugh + self.like + self.heart


# ---------------------------------------------------------------- vocabulary

_WORDS = (
    "masterpiece",
    "best quality",
    "1girl",
    "portrait",
    "cinematic lighting",
    "landscape",
    "cyberpunk city",
    "forest at dawn",
    "watercolor",
    "photorealistic",
    "8k",
    "bokeh",
    "neon",
    "castle",
    "dragon",
    "café au lait",
    "naïve art",
    "日本の風景",
    "桜の木",
    "ночной город",
    "Ünïcödé façade",
    "✨ sparkles ✨",
    "smiling",
    "detailed eyes",
    "film grain",
    "oil painting",
)
_SAMPLERS = ("DPM++ 2M Karras", "Euler a", "Euler", "DPM++ SDE Karras", "DDIM", "UniPC")
_SIZES = ((832, 1216), (1216, 832), (1024, 1024), (512, 768), (768, 512), (896, 1152), (1920, 1080))
_TAGS = tuple(
    enumerate(
        (
            "woman",
            "man",
            "outdoors",
            "indoors",
            "animal",
            "car",
            "robot",
            "anime",
            "architecture",
            "food",
            "fantasy",
            "sci-fi",
            "portrait",
            "landscape",
            "clothing",
            "horror",
            "cat",
            "dog",
            "flower",
            "water",
        ),
        start=5133,
    )
)
_TAG_NAMES = dict(_TAGS)
_B83 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz#$%*+,-.:;=?@[]^_{|}~"
_BLUR = "".join(random.Random(83).choices(_B83, k=4036))  # hashes are windows of it: no per-item loop
_NAMES_A = ("Silver", "Neon", "Quiet", "Lazy", "Crimson", "Pixel", "Velvet", "Iron", "Ajuro", "Mochi")
_NAMES_B = ("Fox", "Art", "Dreamer", "Forge", "Lab", "Owl", "Smith", "Studio", "", "Cat")


def _like(h: int) -> int:
    return (h & 0x3FF) * (1 + ((h >> 10) & 0x7))


def _reactions(h: int) -> int:
    """Stats.reactions straight from the stat hash: sorting a million rows cannot afford objects."""
    like = _like(h)
    return ((h >> 13) & 0x1F) + ((h >> 18) & 0x3F) + like + like * ((h >> 24) & 0x3) // 4


_METRICS: dict[str, Callable[[int], int]] = {
    "Most Reactions": _reactions,
    "Most Comments": lambda h: (h >> 26) & 0x1F,
    "Most Collected": lambda h: (h >> 31) & 0xFF,
}


def _served_reactions(s: Stats) -> int:
    return s.reactions


def _served_comments(s: Stats) -> int:
    return s.comment


def _served_collected(s: Stats) -> int:
    return s.collected


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _uuid(h: int) -> str:
    x = f"{h:016x}{mix64(h):016x}"
    return f"{x[:8]}-{x[8:12]}-4{x[13:16]}-a{x[17:20]}-{x[20:32]}"


# ---------------------------------------------------------------- the dataset


@dataclass
class _Columns:
    """Per-image columns, index-aligned; ids ascend with the index."""

    ids: array[int] = field(default_factory=lambda: array("q"))
    version: array[int] = field(default_factory=lambda: array("i"))  # primary version index
    extra: array[int] = field(default_factory=lambda: array("i"))  # overlapping version index or -1
    post: array[int] = field(default_factory=lambda: array("i"))  # post index
    level: array[int] = field(default_factory=lambda: array("b"))  # index into LEVELS
    type: array[int] = field(default_factory=lambda: array("b"))  # index into TYPES
    flags: bytearray = field(default_factory=bytearray)  # _HIDDEN | _DELETED


class Dataset:
    """The image index: built once from a spec, then grown or shrunk live by tests."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self.generation = 0  # bumped on every change: selections cached by it
        self._rng = random.Random(spec.seed)
        self._versions: list[VersionSpec] = [v for m in spec.models for v in m.versions]
        self._version_model: list[int] = [m.id for m in spec.models for _ in m.versions]
        self._version_index = {v.id: i for i, v in enumerate(self._versions)}
        self._published: set[int] = set()
        self._post_user = array(
            "i", (self._rng.randrange(max(spec.users, 1)) for _ in range(max(spec.posts, 1)))
        )
        self._usernames = [self._username(u) for u in range(max(spec.users, 1))]
        self._user_index = {n.lower(): u for u, n in enumerate(self._usernames)}
        self.cols = _Columns()
        self._members: list[array[int]] = [array("i") for _ in self._versions]
        self._step_ms = _SPAN_MS // max(spec.total_images * 3, 1)  # ids grow ~2.5 per image
        self._selections: dict[tuple[int, ImageQuery], array[int]] = {}
        self._post_members: list[array[int]] | None = None
        self._reactions: dict[int, Stats] = {}  # reactions added live (react), on top of the seeded ones
        self._build()

    # -------------------------------------------------------- building

    def _username(self, u: int) -> str:
        if u == 0 and self.spec.users >= 3:
            return "unknown"  # what the API shows for deleted accounts
        h = mix64(self.spec.seed * 7919 + u)
        return f"{_NAMES_A[h % 10]}{_NAMES_B[(h >> 8) % 10]}{u}"

    def _build(self) -> None:
        rng, n = self._rng, self.spec.total_images
        owner = [vi for vi, v in enumerate(self._versions) for _ in range(v.images)]
        rng.shuffle(owner)  # versions' images interleave in time, as in reality
        gaps = rng.choices((1, 1, 1, 2, 3, 7), k=n)
        c = self.cols
        c.ids = array("q", itertools.accumulate(gaps, initial=self.spec.first_image_id - 1))[1:]
        c.version = array("i", owner)
        c.extra = array("i", itertools.repeat(-1, n))
        c.post = array("i", rng.choices(range(max(self.spec.posts, 1)), k=n))
        c.level = array("b", rng.choices(range(5), weights=self.spec.level_weights, k=n))
        c.type = array("b", rng.choices(range(3), weights=self.spec.type_weights, k=n))
        c.flags = bytearray(n)
        self._add_overlap(n)
        for i in range(n):
            self._members[c.version[i]].append(i)
            if c.extra[i] >= 0:
                self._members[c.extra[i]].append(i)
        self._hide_runs()

    def _add_overlap(self, n: int) -> None:
        """Give a fraction of images a second version of the same model."""
        siblings = {m.id: [self._version_index[v.id] for v in m.versions] for m in self.spec.models}
        for i in self._rng.sample(range(n), int(n * self.spec.overlap)):
            vi = self.cols.version[i]
            others = [s for s in siblings[self._version_model[vi]] if s != vi]
            if others:
                self.cols.extra[i] = self._rng.choice(others)

    def _hide_runs(self) -> None:
        """Hide rows in runs within each version, so whole pages can come back empty."""
        for members in self._members:
            budget = int(len(members) * self.spec.hidden_rate)
            while budget > 0:
                run = min(budget, self._rng.randint(1, 12))
                start = self._rng.randrange(len(members))
                for i in members[start : start + run]:
                    self.cols.flags[i] |= _HIDDEN
                budget -= run

    # -------------------------------------------------------- live changes

    def add_images(self, version_id: int, n: int, *, post_id: int | None = None) -> list[int]:
        """Add n images at the head (newest, highest ids) of a version; returns their ids."""
        vi, c = self._version_index[version_id], self.cols
        post = self.post_index(post_id) if post_id is not None else None
        new: list[int] = []
        for _ in range(n):
            c.ids.append(c.ids[-1] + self._rng.randint(1, 3) if c.ids else self.spec.first_image_id)
            c.version.append(vi)
            c.extra.append(-1)
            c.post.append(post if post is not None else self._rng.randrange(max(self.spec.posts, 1)))
            c.level.append(self._rng.choices(range(5), weights=(50, 20, 15, 10, 5))[0])
            c.type.append(0)
            c.flags.append(0)
            self._members[vi].append(len(c.ids) - 1)
            new.append(c.ids[-1])
        self._changed()
        return new

    def delete_images(self, ids: Iterable[int]) -> int:
        """Remove images from every listing (offsets shift: walkers miss rows); returns how many."""
        count = 0
        for image_id in ids:
            i = self.index_of(image_id)
            if i is not None and not self.cols.flags[i] & _DELETED:
                self.cols.flags[i] |= _DELETED
                count += 1
        self._changed()
        return count

    def hide_images(self, ids: Iterable[int]) -> int:
        """Hide images (moderation): gaps in feed pages, absent from ids= lookups; returns how many."""
        count = 0
        for image_id in ids:
            i = self.index_of(image_id)
            if i is not None and not self.cols.flags[i] & _HIDDEN:
                self.cols.flags[i] |= _HIDDEN
                count += 1
        self._changed()
        return count

    def set_browsing_level(self, ids: Iterable[int], level: int) -> int:
        """Re-rate images (browsingLevel 1, 2, 4, 8 or 16), as moderators do; returns how many."""
        index = LEVELS.index(level)
        count = 0
        for image_id in ids:
            i = self.index_of(image_id)
            if i is not None and self.cols.level[i] != index:
                self.cols.level[i] = index
                count += 1
        self._changed()
        return count

    def react(
        self,
        ids: Iterable[int],
        *,
        like: int = 0,
        heart: int = 0,
        laugh: int = 0,
        cry: int = 0,
        comment: int = 0,
    ) -> int:
        """Add reactions and comments to images, as their viewers do after first sight (the sorts by
        them follow); returns how many images changed."""
        count = 0
        for image_id in ids:
            if self.index_of(image_id) is None:
                continue
            d = self._reactions.get(image_id, Stats(0, 0, 0, 0, 0, 0, 0))
            self._reactions[image_id] = Stats(
                d.cry + cry, d.laugh + laugh, d.like + like, 0, d.heart + heart, d.comment + comment, 0
            )
            count += 1
        self._changed()
        return count

    def _changed(self) -> None:
        self.generation += 1
        self._selections.clear()
        self._post_members = None

    # -------------------------------------------------------- lookups

    def __len__(self) -> int:
        return len(self.cols.ids)

    def index_of(self, image_id: int) -> int | None:
        i = bisect.bisect_left(self.cols.ids, image_id)
        return i if i < len(self.cols.ids) and self.cols.ids[i] == image_id else None

    def post_index(self, post_id: int) -> int | None:
        p = post_id - self.spec.first_post_id
        return p if 0 <= p < len(self._post_user) else None

    def post_id(self, i: int) -> int:
        return self.spec.first_post_id + self.cols.post[i]

    def user_id(self, u: int) -> int:
        return _FIRST_USER_ID + u

    def username_of(self, i: int) -> str:
        return self._usernames[self._post_user[self.cols.post[i]]]

    @property
    def usernames(self) -> list[str]:
        return list(self._usernames)

    @property
    def post_ids(self) -> list[int]:
        return [self.spec.first_post_id + p for p in range(len(self._post_user))]

    def created_ms(self, image_id: int) -> int:
        return _T0_MS + (image_id - self.spec.first_image_id) * self._step_ms

    def now_ms(self) -> int:
        """The dataset's clock: just after its newest image."""
        return self.created_ms(self.cols.ids[-1]) + 1 if self.cols.ids else _T0_MS

    def is_hidden(self, i: int) -> bool:
        return bool(self.cols.flags[i] & _HIDDEN)

    def stats(self, image_id: int) -> Stats:
        h = self._stat_hash(image_id)
        like = _like(h)
        d = self._reactions.get(image_id)
        s = Stats(
            cry=(h >> 13) & 0x1F,
            laugh=(h >> 18) & 0x3F,
            like=like,
            dislike=0,
            heart=like * ((h >> 24) & 0x3) // 4,
            comment=(h >> 26) & 0x1F,
            collected=(h >> 31) & 0xFF,
        )
        if d is None:
            return s
        return Stats(
            s.cry + d.cry,
            s.laugh + d.laugh,
            s.like + d.like,
            0,
            s.heart + d.heart,
            s.comment + d.comment,
            s.collected,
        )

    def _stat_hash(self, image_id: int) -> int:
        return mix64(image_id ^ (self.spec.seed << 40))

    def base_model(self, i: int) -> str | None:
        h = mix64(self.cols.ids[i] * 31 + self.spec.seed) % 100
        return None if h < 3 else "" if h < 5 else self._versions[self.cols.version[i]].base_model

    def tag_ids(self, image_id: int) -> list[int]:
        h = mix64(image_id * 17 + self.spec.seed)
        return sorted({_TAGS[(h >> (5 * k)) % len(_TAGS)][0] for k in range(2 + h % 4)})

    def version_image_ids(self, version_id: int, *, levels: int = 31, visible_only: bool = True) -> list[int]:
        """Ids a complete walk of modelVersionId=version_id should yield (for tests)."""
        c = self.cols
        skip = (_HIDDEN | _DELETED) if visible_only else _DELETED
        return [
            c.ids[i]
            for i in self._members[self._version_index[version_id]]
            if not c.flags[i] & skip and LEVELS[c.level[i]] & levels
        ]

    def walk_ids(self, q: ImageQuery, *, walk_cap: int | None = None) -> list[int]:
        """Ids a complete feed walk of q yields, in order: visible rows of the first `walk_cap`
        positions (ServerOptions.walk_cap), all of them when None. For tests."""
        rows = self.select(q)
        return [self.cols.ids[i] for i in rows[:walk_cap] if not self.is_hidden(i)]

    def version_ids(self, model_id: int) -> list[int]:
        return [v.id for v, m in zip(self._versions, self._version_model, strict=True) if m == model_id]

    # -------------------------------------------------------- selection

    def select(self, q: ImageQuery) -> array[int]:
        """Indices matching q (deleted rows out, hidden rows in), in q's sort order; cached."""
        key = (self.generation, q)
        hit = self._selections.get(key)
        if hit is None:
            hit = self._sorted(q, [i for i in self._base(q) if self._matches(i, q)])
            if len(self._selections) >= 256:  # bounded: drop the oldest
                del self._selections[next(iter(self._selections))]
            self._selections[key] = hit
        return hit

    def _base(self, q: ImageQuery) -> Iterable[int]:
        """The smallest index to scan for q."""
        if q.ids:
            return sorted(i for i in map(self.index_of, q.ids) if i is not None)
        if q.image_id is not None:
            i = self.index_of(q.image_id)
            return () if i is None else (i,)
        if q.model_version_id is not None:
            vi = self._version_index.get(q.model_version_id)
            return () if vi is None else self._members[vi]
        if q.model_id is not None:
            vis = [i for i, m in enumerate(self._version_model) if m == q.model_id]
            return sorted(set(itertools.chain.from_iterable(self._members[v] for v in vis)))
        if q.post_id is not None:
            p = self.post_index(q.post_id)
            return () if p is None else self._by_post()[p]
        if q.username is not None:
            return self._by_user(self._user_index.get(q.username, -1))
        if q.user_id is not None:
            return self._by_user(q.user_id - _FIRST_USER_ID)
        return range(len(self.cols.ids))

    def _by_user(self, u: int) -> list[int]:
        posts = [p for p, owner in enumerate(self._post_user) if owner == u]
        return sorted(itertools.chain.from_iterable(self._by_post()[p] for p in posts))

    def _by_post(self) -> list[array[int]]:
        """Indices per post, built on first use (post shards are common) and dropped on change."""
        if self._post_members is None:
            self._post_members = [array("i") for _ in self._post_user]
            for i, p in enumerate(self.cols.post):
                self._post_members[p].append(i)
        return self._post_members

    def _matches(self, i: int, q: ImageQuery) -> bool:
        c = self.cols
        if c.flags[i] & _DELETED or not LEVELS[c.level[i]] & q.levels:
            return False
        if q.ids and c.ids[i] not in q.ids:
            return False
        if q.image_id is not None and c.ids[i] != q.image_id:
            return False
        if q.type is not None and TYPES[c.type[i]] != q.type:
            return False
        if q.model_version_id is not None and not self._in_version(i, q.model_version_id):
            return False
        if q.model_id is not None and self._version_model[c.version[i]] != q.model_id:
            return False
        if q.post_id is not None and self.post_id(i) != q.post_id:
            return False
        if q.username is not None and self.username_of(i).lower() != q.username:
            return False
        if q.user_id is not None and self.user_id(self._post_user[c.post[i]]) != q.user_id:
            return False
        if q.period != "AllTime" and self.created_ms(c.ids[i]) < self.now_ms() - PERIOD_MS[q.period]:
            return False
        if q.base_models and self.base_model(i) not in q.base_models:
            return False
        return not q.tags or q.tags <= set(self.tag_ids(c.ids[i]))

    def _in_version(self, i: int, version_id: int) -> bool:
        vi = self._version_index.get(version_id, -2)
        return self.cols.version[i] == vi or self.cols.extra[i] == vi

    def _sorted(self, q: ImageQuery, rows: list[int]) -> array[int]:
        ids, seed = self.cols.ids, self.spec.seed
        if q.sort == "Oldest":
            return array("i", rows)
        if q.sort == "Newest":
            return array("i", reversed(rows))
        if q.sort == "Random":
            return array("i", sorted(rows, key=lambda i: mix64(ids[i] ^ seed)))
        metric, stat = _METRICS[q.sort], self._stat_hash
        if self._reactions:  # some counts grew since they were seeded: sort by what is served
            by: Callable[[Stats], int] = {
                "Most Reactions": _served_reactions,
                "Most Comments": _served_comments,
            }.get(q.sort, _served_collected)
            return array("i", sorted(rows, key=lambda i: (by(self.stats(ids[i])), ids[i]), reverse=True))
        return array("i", sorted(rows, key=lambda i: (metric(stat(ids[i])), ids[i]), reverse=True))

    # -------------------------------------------------------- rendering

    def item(
        self, i: int, *, with_meta: bool = False, with_tags: bool = False, nested_meta: bool = False
    ) -> dict[str, Any]:
        c = self.cols
        image_id, level, kind = c.ids[i], c.level[i], TYPES[c.type[i]]
        h = mix64(image_id ^ self.spec.seed)
        width, height = _SIZES[h % len(_SIZES)]
        s = self.stats(image_id)
        resources = self._resources(i, h)
        meta = self._meta(i, h, resources) if with_meta else None
        item: dict[str, Any] = {
            "id": image_id,
            "url": self._url(h, kind, width),
            "hash": _BLUR[h % 4000 : h % 4000 + 36],
            "width": width,
            "height": height,
            "nsfwLevel": LEVEL_NAMES[level],
            "type": kind,
            "nsfw": level > 0,
            "browsingLevel": LEVELS[level],
            "createdAt": _iso(self.created_ms(image_id)),
            "postId": self.post_id(i),
            "stats": {
                "cryCount": s.cry,
                "laughCount": s.laugh,
                "likeCount": s.like,
                "dislikeCount": s.dislike,
                "heartCount": s.heart,
                "commentCount": s.comment,
            },
            "meta": {"id": image_id, "meta": meta} if nested_meta and with_meta else meta,
            "username": self.username_of(i),
            "baseModel": self.base_model(i),
            "modelVersionIds": list(dict.fromkeys(r["modelVersionId"] for r in resources)),
        }
        if with_tags:
            item["tags"] = [{"id": t, "name": _TAG_NAMES[t]} for t in self.tag_ids(image_id)]
        return item

    def _url(self, h: int, kind: str, width: int) -> str:
        u = _uuid(h)
        ext = {"image": "jpeg", "video": "mp4", "audio": "mp3"}[kind]
        return f"https://image.civitai.com/xG1nkqKTMzGDvpLrqFT7WA/{u}/width={width}/{u}.{ext}"

    def _resources(self, i: int, h: int) -> list[dict[str, Any]]:
        """Auto-detected resources: the served version is often, not always, among them."""
        c, out = self.cols, []
        if (h >> 20) % 10 < 7:
            out.append({"type": "checkpoint", "modelVersionId": self._versions[c.version[i]].id})
        if c.extra[i] >= 0 and (h >> 24) % 10 < 7:
            out.append({"type": "lora", "weight": 0.65, "modelVersionId": self._versions[c.extra[i]].id})
        for k in range((h >> 28) % 3):
            other = 100_000 + (h >> (30 + 7 * k)) % 5000  # popular LoRAs outside the dataset
            out.append({"type": "lora", "weight": round(0.3 + k * 0.2, 2), "modelVersionId": other})
        return out

    def _meta(self, i: int, h: int, resources: list[dict[str, Any]]) -> dict[str, Any] | None:
        if h % 100 < 4:
            return None  # the uploader stripped the metadata
        g = mix64(h)  # fresh bits, cheaper than a Random per item
        width, height = _SIZES[h % len(_SIZES)]
        meta: dict[str, Any] = {
            "Size": f"{width}x{height}",
            "seed": g & 0xFFFFFFFF,
            "steps": (20, 25, 30, 45)[(g >> 32) & 3],
            "prompt": ", ".join(_WORDS[(g >> (5 * k)) % len(_WORDS)] for k in range(2, 8)),
            "negativePrompt": "lowres, bad anatomy, 低品質",
            "sampler": _SAMPLERS[(g >> 40) % len(_SAMPLERS)],
            "cfgScale": (3.5, 5, 7, 7.5)[(g >> 44) & 3],
            "clipSkip": 1 + (g >> 46) % 2,
            "resources": [],
            "civitaiResources": resources,
        }
        if (g >> 48) & 1:  # tools drop in keys of their own: keep them opaque
            meta["Model hash"] = f"{g & 0xFFFFFFFFFF:010x}"
            meta["ADetailer model"] = "face_yolov8n.pt"
        if (g >> 50) % 5 == 0:
            meta["comfy"] = {"workflow": {"nodes": [{"id": 3, "type": "KSampler"}], "version": 0.4}}
        return meta

    def model(self, model_id: int) -> dict[str, Any] | None:
        """The GET /models/{id} object: only published versions are listed."""
        m = next((m for m in self.spec.models if m.id == model_id), None)
        if m is None:
            return None
        return {
            "id": m.id,
            "name": m.name or f"Model {m.id}",
            "description": "<p>A synthetic model.</p>",
            "type": m.type,
            "poi": False,
            "nsfw": False,
            "allowNoCredit": True,
            "creator": {"username": self._usernames[m.id % len(self._usernames)], "image": None},
            "tags": ["base model"],
            "modelVersions": [
                self._version_obj(m, v) for v in m.versions if v.published or v.id in self._published
            ],
        }

    def publish(self, version_id: int) -> None:
        """Publish a version the spec held back: the model gains a version, as happens live."""
        self._published.add(version_id)

    def _version_obj(self, m: ModelSpec, v: VersionSpec) -> dict[str, Any]:
        return {
            "id": v.id,
            "modelId": m.id,
            "name": v.name or f"v{v.id}",
            "baseModel": v.base_model,
            "baseModelType": "Standard",
            "status": "Published",
            "createdAt": _iso(_T0_MS + v.id % 1000 * 86_400_000),
            "trainedWords": [],
            "files": [
                {
                    "id": v.id * 10,
                    "name": f"model_{v.id}.safetensors",
                    "type": "Model",
                    "primary": True,
                    "sizeKB": 6_775_430.0,
                    "downloadUrl": f"https://civitai.com/api/download/models/{v.id}",
                }
            ],
            "images": [],
            "downloadUrl": f"https://civitai.com/api/download/models/{v.id}",
        }


def models_from_sizes(sizes: Mapping[int, Sequence[tuple[int, int]]]) -> tuple[ModelSpec, ...]:
    """{model_id: [(version_id, images), ...]} -> ModelSpec tuple, for compact test specs."""
    return tuple(ModelSpec.from_obj(mid, list(vs)) for mid, vs in sizes.items())
