"""The config loader: what a valid file becomes, and one clear line for every mistake."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import harvest, write_config
from crawler.civitai.images import LIST_KEYS, NSFW_LEVELS, PERIODS, SORTS, TYPES
from crawler.config import (
    API_KEY_ENV,
    QUERY_KEYS,
    ApiConfig,
    Config,
    MediaConfig,
    OutputConfig,
    Query,
    api_key,
    load_config,
    parse_config,
)
from crawler.errors import ConfigError, ExitCode

MINIMAL = '[output]\ndir = "out"\n[[queries]]\nmodelId = 1\n'


def write(tmp_path: Path, text: str, name: str = "harvest.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def refused(path: Path | str) -> str:
    """The one-line message load_config raises for `path`."""
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"{path}: ")
    assert caught.value.exit_code == ExitCode.USAGE
    return message


def test_full_config_round_trips(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    path = write(
        configs,
        """
[api]
base_url = "http://127.0.0.1:8080/api/v1/"
requests_per_second = 5
concurrency = 2
timeout = 12.5
max_retries = 0
max_backoff = 4

[output]
dir = "../data/model-827184"

[[queries]]
name = "model 827184"
modelId = 827184
sort = "Newest"
browsingLevel = 31
withMeta = true

[[queries]]
postId = [3, 1, 3, 2]
tags = [7, 8]
baseModels = ["SDXL 1.0", "Pony"]
nsfw = false
period = "AllTime"
type = "video"
limit = 50
withTags = false

[[queries]]
username = "Ajuro"
tags = " 4, 5 "
baseModels = "SDXL 1.0"
nsfw = "Soft"
imageId = 9
userId = 3
modelVersionId = 44
""",
    )
    config = load_config(str(path))
    out_dir = (tmp_path / "data" / "model-827184").resolve()
    assert config == Config(
        path=path,
        api=ApiConfig("http://127.0.0.1:8080/api/v1", 5.0, 2, 12.5, 0, 4.0),
        output=OutputConfig(out_dir),
        media=MediaConfig(out_dir / "media"),
        queries=(
            Query(
                "model 827184",
                (
                    ("browsingLevel", "31"),
                    ("limit", "200"),
                    ("modelId", "827184"),
                    ("sort", "Newest"),
                    ("withMeta", "true"),
                ),
            ),
            Query(
                "query-2",
                (
                    ("baseModels", "SDXL 1.0,Pony"),
                    ("limit", "50"),
                    ("nsfw", "false"),
                    ("period", "AllTime"),
                    ("postId", ("3", "1", "2")),
                    ("tags", "7,8"),
                    ("type", "video"),
                    ("withTags", "false"),
                ),
            ),
            Query(
                "query-3",
                (
                    ("baseModels", "SDXL 1.0"),
                    ("imageId", "9"),
                    ("limit", "200"),
                    ("modelVersionId", "44"),
                    ("nsfw", "Soft"),
                    ("tags", "4,5"),
                    ("userId", "3"),
                    ("username", "Ajuro"),
                ),
            ),
        ),
    )
    assert isinstance(config.api.requests_per_second, float)
    assert config.queries[1].get("postId") == ("3", "1", "2")
    assert config.queries[0].get("name") is None and config.queries[0].get("cursor") is None


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + "[[queries]]\nuserId = 2\n"))
    assert config.api == ApiConfig()
    assert [q.name for q in config.queries] == ["query-1", "query-2"]
    assert config.queries[0].params == (("limit", "200"), ("modelId", "1"))


def test_relative_dir_follows_the_config_not_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "configs").mkdir()
    write(tmp_path / "configs", MINIMAL)
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = load_config("../configs/harvest.toml")
    assert config.path == Path("../configs/harvest.toml")
    assert config.output.dir == (tmp_path / "configs" / "out").resolve()
    assert config.output.dir.is_absolute()


def test_absolute_dir_and_parse_config(tmp_path: Path) -> None:
    data = {"output": {"dir": str(tmp_path / "abs")}, "queries": [{"modelId": 1}]}
    assert parse_config(data, tmp_path / "x.toml").output.dir == (tmp_path / "abs").resolve()


def test_exported_constants() -> None:
    assert LIST_KEYS == {"postId", "modelVersionId", "userId", "modelId", "username"}
    assert LIST_KEYS < QUERY_KEYS and "name" in QUERY_KEYS and "page" not in QUERY_KEYS
    assert SORTS[0] == "Most Reactions" and "AllTime" in PERIODS and TYPES == ("image", "video", "audio")
    assert NSFW_LEVELS == ("None", "Soft", "Mature", "X")


def test_spec_messages_verbatim(tmp_path: Path) -> None:
    path = write(tmp_path, '[output]\ndir = "o"\n[[queries]]\nmodelid = 1\n')
    assert refused(path) == f'{path}: queries[1]: unknown key "modelid"; did you mean "modelId"?'
    path = write(tmp_path, '[output]\ndir = "o"\n[[queries]]\nmodelId = 1\n[[queries]]\nlimit = "100"\n')
    assert refused(path) == f'{path}: queries[2].limit: expected an integer from 1 to 200, got "100" (string)'
    path = write(tmp_path, '[output]\ndir = "o"\n[[queries]]\nsort = "newest"\n')
    assert refused(path) == (
        f'{path}: queries[1].sort: "newest" is not one of "Most Reactions", "Most Comments", '
        '"Most Collected", "Newest", "Oldest", "Random"; did you mean "Newest"?'
    )


Q = '[output]\ndir = "o"\n[[queries]]\n'  # a file whose (only) query follows

ERRORS: list[tuple[str, list[str]]] = [
    # unknown keys, with and without a suggestion
    ("quries = 1\n" + MINIMAL, ['unknown key "quries"; did you mean "queries"?']),
    ("[api]\ntimout = 3\n" + MINIMAL, ['api: unknown key "timout"; did you mean "timeout"?']),
    (
        '[output]\ndir = "o"\ndirr = 1\n[[queries]]\nmodelId = 1\n',
        ['output: unknown key "dirr"; did you mean "dir"?'],
    ),
    (Q + "zzzzz = 1\n", ['queries[1]: unknown key "zzzzz"']),
    (Q + 'BASEMODELS = "x"\n', ['did you mean "baseModels"?']),
    # wrong types and ranges
    (Q + "limit = 0\n", ["queries[1].limit: expected an integer from 1 to 200, got 0 (integer)"]),
    (Q + "limit = 201\n", ["queries[1].limit", "got 201"]),
    (Q + "limit = true\n", ["queries[1].limit", "got true (boolean)"]),
    (Q + "limit = 100.0\n", ["queries[1].limit", "got 100.0 (float)"]),
    (Q + "modelId = 0\n", ["queries[1].modelId: expected a positive integer, got 0"]),
    (Q + "imageId = true\n", ["queries[1].imageId", "(boolean)"]),
    (Q + 'userId = "5"\n', ["queries[1].userId", '"5" (string)']),
    (Q + "browsingLevel = 32\n", ["queries[1].browsingLevel: expected an integer from 1 to 31"]),
    (Q + "browsingLevel = 0\n", ["queries[1].browsingLevel"]),
    (Q + 'withMeta = "true"\n', ['queries[1].withMeta: expected true or false, got "true" (string)']),
    (Q + "withTags = 1\n", ["queries[1].withTags", "1 (integer)"]),
    (Q + 'period = "alltime"\n', ["queries[1].period", 'did you mean "AllTime"?']),
    (Q + 'type = "Image"\n', ["queries[1].type", 'did you mean "image"?']),
    (Q + "type = 1\n", ['queries[1].type: expected one of "image", "video", "audio", got 1 (integer)']),
    (Q + 'nsfw = "soft"\n', ["queries[1].nsfw", 'did you mean "Soft"?']),
    (Q + "nsfw = 3\n", ["queries[1].nsfw: expected true, false or one of"]),
    (Q + 'tags = "1,a"\n', ["queries[1].tags", '"1,a" (string)']),
    (Q + "tags = []\n", ["queries[1].tags"]),
    (Q + "tags = [1, 0]\n", ["queries[1].tags[2]: expected a positive integer, got 0"]),
    (Q + "baseModels = []\n", ["queries[1].baseModels"]),
    (Q + 'baseModels = ["SDXL", 3]\n', ["queries[1].baseModels[2]: expected a non-empty string, got 3"]),
    (Q + 'username = ""\n', ["queries[1].username: expected a non-empty string"]),
    (Q + "name = 3\n", ["queries[1].name: expected a non-empty string, got 3 (integer)"]),
    (Q + "when = 1979-05-27\n", ['queries[1]: unknown key "when"']),
    (Q + "sort = 1979-05-27T07:32:00Z\n", ["queries[1].sort", "(datetime)"]),
    # lists
    (Q + "postId = []\n", ["queries[1].postId: expected a non-empty list, got [] (array)"]),
    (Q + 'postId = [1, "x"]\n', ['queries[1].postId[2]: expected a positive integer, got "x" (string)']),
    (Q + 'username = ["a", ""]\n', ["queries[1].username[2]"]),
    (Q + "imageId = [1, 2]\n", ["queries[1].imageId: expected a positive integer, got [1, 2] (array)"]),
    (Q + 'sort = ["Newest"]\n', ["queries[1].sort", "(array)"]),
    (Q + "postId = [1]\nuserId = [2, 3]\n", ["queries[1]: ", '"postId" and "userId" are both lists']),
    # cursors and secrets
    (Q + "page = 2\n", ["queries[1].page: the harvester walks cursors itself; remove it"]),
    (
        Q + 'modelId = 1\ncursor = "5|1"\n',
        ["queries[1].cursor: the harvester walks cursors itself; remove it"],
    ),
    (Q + 'token = "abc"\n', ["queries[1].token", "CIVITAI_API_KEY"]),
    ('[api]\napi_key = "abc"\n' + MINIMAL, ["api.api_key", "environment variable CIVITAI_API_KEY"]),
    ('apiKey = "abc"\n' + MINIMAL, ["apiKey", "CIVITAI_API_KEY"]),
    (
        '[output]\ndir = "o"\nauth_token = "x"\n[[queries]]\nmodelId = 1\n',
        ["output.auth_token", "CIVITAI_API_KEY"],
    ),
    # tables and their shapes
    ('[output]\ndir = "o"\n', ["no queries: add at least one [[queries]] table"]),
    ('queries = []\n[output]\ndir = "o"\n', ["no queries"]),
    ('[output]\ndir = "o"\n[queries]\nmodelId = 1\n', ["queries: expected an array of tables ([[queries]])"]),
    ('queries = [1]\n[output]\ndir = "o"\n', ["queries[1]: expected a table ([[queries]]), got 1 (integer)"]),
    ("api = 3\n" + MINIMAL, ["api: expected a table ([api]), got 3 (integer)"]),
    ('output = "o"\n[[queries]]\nmodelId = 1\n', ["output: expected a table ([output])"]),
    ("[[queries]]\nmodelId = 1\n", ["missing [output] table"]),
    ("[output]\n[[queries]]\nmodelId = 1\n", ['output: missing key "dir"']),
    ('[output]\ndir = ""\n[[queries]]\nmodelId = 1\n', ["output.dir: expected a non-empty string"]),
    ('[output]\ndir = "a\\u0000b"\n[[queries]]\nmodelId = 1\n', ["output.dir: unusable path"]),
    ('queries = 0\n[output]\ndir = "o"\n', ["queries: expected an array of tables", "got 0 (integer)"]),
    # names
    (
        Q + 'name = "a"\n[[queries]]\nname = "b"\n[[queries]]\nname = "a"\n',
        ['queries[3].name: "a" is already the name of queries[1]'],
    ),
    (Q + 'modelId = 1\n[[queries]]\nname = "query-1"\n', ['queries[2].name: "query-1" is already the name']),
    # [api] values
    (
        '[api]\nbase_url = "ftp://x.org"\n' + MINIMAL,
        ["api.base_url: expected an http(s) URL", '"ftp://x.org"'],
    ),
    ('[api]\nbase_url = "https://"\n' + MINIMAL, ["api.base_url"]),
    ('[api]\nbase_url = "civitai.com/api/v1"\n' + MINIMAL, ["api.base_url"]),
    ('[api]\nbase_url = "http://h:99999"\n' + MINIMAL, ["api.base_url"]),
    ('[api]\nbase_url = "http://h/?a=1"\n' + MINIMAL, ["api.base_url"]),
    ("[api]\nbase_url = 1\n" + MINIMAL, ["api.base_url", "(integer)"]),
    (
        '[api]\nbase_url = "https://user:pw@h.org/api/v1"\n' + MINIMAL,
        ["api.base_url: credentials (user:password) don't belong in the URL", "CIVITAI_API_KEY"],
    ),
    (
        "[api]\nrequests_per_second = 0\n" + MINIMAL,
        ["api.requests_per_second: expected a number >= 0.001, got 0"],
    ),
    ("[api]\nrequests_per_second = 1e-300\n" + MINIMAL, ["api.requests_per_second", ">= 0.001", "1e-300"]),
    ("[api]\nrequests_per_second = 5e-324\n" + MINIMAL, ["api.requests_per_second", ">= 0.001"]),
    ('[api]\nrequests_per_second = "2"\n' + MINIMAL, ["api.requests_per_second", "(string)"]),
    ("[api]\ntimeout = -1.5\n" + MINIMAL, ["api.timeout: expected a number > 0, got -1.5 (float)"]),
    ("[api]\ntimeout = inf\n" + MINIMAL, ["api.timeout", "got inf (float)"]),
    ("[api]\nmax_backoff = nan\n" + MINIMAL, ["api.max_backoff", "got nan"]),
    ("[api]\nmax_backoff = true\n" + MINIMAL, ["api.max_backoff", "(boolean)"]),
    (
        "[api]\nconcurrency = 0\n" + MINIMAL,
        ['api.concurrency: expected an integer from 1 to 256 or "auto", got 0'],
    ),
    (
        "[api]\nconcurrency = 1000\n" + MINIMAL,
        ['api.concurrency: expected an integer from 1 to 256 or "auto"', "1000"],
    ),
    ("[api]\nconcurrency = 2.0\n" + MINIMAL, ["api.concurrency", "(float)"]),
    ("[api]\nmax_retries = -1\n" + MINIMAL, ["api.max_retries: expected an integer >= 0, got -1"]),
    ("[api]\nmax_retries = false\n" + MINIMAL, ["api.max_retries", "(boolean)"]),
]


@pytest.mark.parametrize(("text", "needles"), ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_each_mistake_is_one_line_naming_the_culprit(tmp_path: Path, text: str, needles: list[str]) -> None:
    message = refused(write(tmp_path, text))
    for needle in needles:
        assert needle in message


@pytest.mark.parametrize(
    "url",
    [
        "https://user:s3cret@h.org/api",
        "http://:s3cret@h.org",
        "user:s3cret@h.org/api",
        "https://u:s3cret@[bad/",
    ],
)
def test_a_password_in_base_url_is_refused_and_never_echoed(tmp_path: Path, url: str) -> None:
    message = refused(write(tmp_path, f'[api]\nbase_url = "{url}"\n' + MINIMAL))
    assert "api.base_url" in message and "user:password" in message and "s3cret" not in message


def test_an_at_sign_after_the_host_is_not_a_credential(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[api]\nbase_url = "https://h.org/api/@v1"\n' + MINIMAL))
    assert config.api.base_url == "https://h.org/api/@v1"


def test_no_suggestion_when_nothing_is_close(tmp_path: Path) -> None:
    assert "did you mean" not in refused(write(tmp_path, Q + "zzzzz = 1\n"))
    assert "did you mean" not in refused(write(tmp_path, Q + 'sort = "qqq"\n'))


def test_odd_values_stay_on_one_line(tmp_path: Path) -> None:
    assert "queries[1].sort" in refused(write(tmp_path, Q + 'sort = "a\\nb\\u2028c"\n'))
    assert 'unknown key "x\\ny"' in refused(write(tmp_path, Q + '"x\\ny" = 1\n'))
    assert len(refused(write(tmp_path, Q + f'sort = "{"x" * 500}"\n'))) < 400


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert refused(path) == f"{path}: no such file"
    assert refused(str(tmp_path / "no-dir" / "x.toml")).endswith(": no such file")


def test_directory(tmp_path: Path) -> None:
    assert "directory" in refused(tmp_path)


def test_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, MINIMAL)

    def deny(self: Path) -> bytes:  # chmod 0 would not stop root, who runs some CI
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    assert refused(path) == f"{path}: cannot read it (permission denied)"


def test_toml_syntax_error(tmp_path: Path) -> None:
    message = refused(write(tmp_path, MINIMAL + "limit = = 3\n"))
    assert "invalid TOML" in message and "(at line 5, column" in message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[output]\ndir = "\xff"\n')
    assert "UTF-8" in refused(path)


# --- properties ------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return json.dumps(value, ensure_ascii=False)  # JSON bools, ints and strings are TOML too


ids = st.integers(min_value=1, max_value=2**40)
text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12).filter(str.strip)
SCALARS: dict[str, st.SearchStrategy[Any]] = {
    "limit": st.integers(1, 200),
    "postId": ids,
    "modelId": ids,
    "modelVersionId": ids,
    "imageId": ids,
    "userId": ids,
    "username": text,
    "period": st.sampled_from(PERIODS),
    "sort": st.sampled_from(SORTS),
    "type": st.sampled_from(TYPES),
    "nsfw": st.booleans() | st.sampled_from(NSFW_LEVELS),
    "browsingLevel": st.integers(1, 31),
    "tags": ids
    | st.lists(ids, min_size=1, max_size=4)
    | st.lists(ids, min_size=1, max_size=4, unique=True).map(lambda xs: ",".join(map(str, xs))),
    "baseModels": text | st.lists(text, min_size=1, max_size=3),
    "withMeta": st.booleans(),
    "withTags": st.booleans(),
}


@st.composite
def queries(draw: st.DrawFn) -> dict[str, Any]:
    query = draw(st.fixed_dictionaries({}, optional=SCALARS))
    if draw(st.booleans()):
        key = draw(st.sampled_from(sorted(LIST_KEYS)))
        query[key] = draw(st.lists(SCALARS[key], min_size=1, max_size=4))
    return query


def wire(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(dict.fromkeys(map(wire, value)))
    return str(value)


def load_one(query: dict[str, Any]) -> Config:
    body = "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in query.items())
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "q.toml"
        path.write_text(f'[output]\ndir = "o"\n[[queries]]\n{body}', encoding="utf-8")
        return load_config(path)


@settings(max_examples=150, deadline=None)
@given(queries())
def test_any_valid_query_loads_wire_ready(query: dict[str, Any]) -> None:
    (loaded,) = load_one(query).queries
    keys = [key for key, _ in loaded.params]
    assert keys == sorted(keys) and loaded.get("limit") == str(query.get("limit", 200))
    for key, value in query.items():
        if key in LIST_KEYS and isinstance(value, list):
            assert loaded.get(key) == tuple(dict.fromkeys(map(wire, value)))
        else:
            assert loaded.get(key) == wire(value)


@settings(max_examples=60, deadline=None)
@given(queries(), st.integers(-(2**63), 0) | st.integers(201, 2**63 - 1))
def test_any_out_of_range_limit_is_refused(query: dict[str, Any], limit: int) -> None:
    with pytest.raises(ConfigError, match=r"queries\[1\]\.limit: expected an integer from 1 to 200"):
        load_one({**query, "limit": limit})


# ---------------------------------------------------------------- the API key from the environment


@pytest.mark.parametrize(
    ("value", "key"),
    [("sk-abc\n", "sk-abc"), ("  sk-abc \r\n", "sk-abc"), ("", None), (" \n", None), (None, None)],
)
def test_api_key_loses_surrounding_whitespace(value: str | None, key: str | None) -> None:
    assert api_key({} if value is None else {API_KEY_ENV: value}) == key


@pytest.mark.parametrize("value", ["abc\x01def", "abc\ndef", "abc\x1b[0mdef", "abc\x85def", "abcdéf"])
def test_api_key_with_control_characters_is_refused_by_name_only(value: str) -> None:
    with pytest.raises(ConfigError) as refused_key:
        api_key({API_KEY_ENV: value})
    message = str(refused_key.value)
    assert API_KEY_ENV in message and "abc" not in message and "\n" not in message


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "configs").glob("*.toml")))
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert config.queries and config.api.base_url.startswith("https://civitai.")


def test_concurrency_is_auto_unless_set(tmp_path: Path) -> None:
    assert ApiConfig().concurrency is None
    auto = load_config(write(tmp_path, '[api]\nconcurrency = "auto"\n' + MINIMAL))
    assert auto.api.concurrency is None
    fixed = load_config(write(tmp_path, "[api]\nconcurrency = 3\n" + MINIMAL))
    assert fixed.api.concurrency == 3
    most = load_config(write(tmp_path, "[api]\nconcurrency = 256\n" + MINIMAL))
    assert most.api.concurrency == 256  # the bound itself is allowed


def test_a_concurrency_above_the_bound_stops_the_cli_with_one_line_and_exit_2(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", "http://127.0.0.1:9/api/v1", [{"modelId": 1}], concurrency=1000)
    result = harvest("run", cfg)
    assert result.code == 2, result
    (line,) = result.stderr.strip().splitlines()
    assert "api.concurrency" in line and "from 1 to 256" in line and "1000" in line
