"""Group values as path segments: encoding, round trips, path safety."""

from __future__ import annotations

import datetime
import errno
import json
import math
import os
import posixpath
from urllib.parse import unquote_to_bytes

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_manymodel.store import (
    MAX_NAME_BYTES,
    MAX_SEGMENT_CHARS,
    NULL_SEGMENT,
    RunStore,
    encode_value,
    group_path,
    key_from_json,
    key_to_json,
    normalize_key,
)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("a/b", "a%2Fb"),
        ("..", ".."),
        ("", ""),
        ("ü", "%C3%BC"),
        (7, "7"),
        ("7", "7"),
        (np.int64(7), "7"),
        (None, NULL_SEGMENT),
        (float("nan"), NULL_SEGMENT),
        (pd.NA, NULL_SEGMENT),
        (NULL_SEGMENT, "%5F" + NULL_SEGMENT[1:]),
        ("a~b", "a%7Eb"),
        ("%2F", "%252F"),
        (pd.Timestamp("2024-01-02 03:04"), "2024-01-02T03%3A04%3A00"),
        (True, "True"),
        (1.0, "1"),
        (np.float32(2.0), "2"),
        (-0.0, "0"),
        (1.5, "1.5"),
        (float("inf"), "inf"),
        (-float("inf"), "-inf"),
        (1e20, "100000000000000000000"),
    ],
)
def test_encode_value(value, expected):
    assert encode_value(value) == expected


@pytest.mark.parametrize(
    "text", [chr(code) for code in range(32, 127)] + ["", "abc-DEF_9.x", "a b", "line\nbreak", "-12", "ü"]
)
def test_texts_that_need_no_escapes_are_left_as_quote_leaves_them(text):
    # the text is checked before quote() is called, for speed: same result
    from urllib.parse import quote

    assert encode_value(text) == quote(text, safe="").replace("~", "%7E")


def test_integer_keys_are_their_digits_and_long_ones_are_shortened():
    assert encode_value(-12) == "-12" and encode_value(np.int32(-12)) == "-12"
    assert encode_value(10**250) == encode_value(str(10**250))
    assert len(encode_value(10**250)) <= MAX_SEGMENT_CHARS and "~" in encode_value(10**250)


@pytest.mark.parametrize("a, b", [(1, 1.0), (np.int64(3), np.float64(3.0)), (0.0, -0.0), (0, -0.0)])
def test_equal_numbers_share_a_folder(a, b):
    # equal for Python and pandas (one group, found by merge): one folder
    assert a == b and group_path(["k"], (a,)) == group_path(["k"], (b,))


def test_only_values_longer_than_the_limit_are_shortened():
    """A value of exactly MAX_SEGMENT_CHARS characters is its folder's name
    as it is (where runs stored its model): only a longer one is hashed."""
    assert encode_value("v" * MAX_SEGMENT_CHARS) == "v" * MAX_SEGMENT_CHARS
    assert "~" in encode_value("v" * (MAX_SEGMENT_CHARS + 1))


def test_a_tuple_of_one_value_names_the_group_of_one_column():
    """pandas names the groups of by=["store"] as tuples, (7,): such a key
    finds group 7, not a group whose value is the tuple."""
    assert normalize_key((7,), 1) == normalize_key(7, 1) == (7,)
    assert group_path(["store"], normalize_key((7,), 1)) == "store=7"


def test_long_values_are_shortened_with_a_hash():
    a, b = "x" * 300, "x" * 299 + "y"
    assert len(encode_value(a)) <= MAX_SEGMENT_CHARS
    assert encode_value(a) != encode_value(b)
    assert "~" in encode_value(a)
    # a cut never leaves half of a %XX escape
    assert "%" not in encode_value("é" * 300).split("~")[0][-2:]


@pytest.mark.parametrize("char", ["é", "Ж", "日", "🏪"])
@pytest.mark.parametrize("lead", range(12))  # the cut at every byte of a 4-byte character
def test_a_shortened_value_keeps_whole_characters(char, lead):
    """Hive readers decode a folder name as UTF-8, and pyarrow refused the
    whole dataset over one long value whose prefix ended within a character
    ("%D0" of "Ж" = "%D0%96")."""
    value = "x" * lead + char * 100
    prefix = encode_value(value).split("~")[0]
    text = unquote_to_bytes(prefix).decode("utf-8")  # raises within a character
    assert value.startswith(text)
    assert len(prefix) > MAX_SEGMENT_CHARS - 17 - 12  # at most one character less
    # a value whose prefix was cut between characters keeps its folder
    assert encode_value("x" * 183 + "é") == encode_value("x" * 183 + "é", cut_within_characters=True)


@pytest.mark.parametrize("column", ["c" * 56, "é" * 30, "k" * 228])
def test_a_long_column_name_leaves_its_values_less_room(column):
    long_values = ["v" * 300, "v" * 299 + "w", None, "é" * 100]
    segments = [group_path([column], (value,)) for value in long_values]
    assert all(len(segment.encode()) <= MAX_NAME_BYTES for segment in segments)
    assert len(set(segments)) == len(segments)  # still one folder per value
    assert segments[2].endswith("=" + NULL_SEGMENT)
    # a short name keeps today's folders
    assert group_path(["k"], ("v" * 300,)) == "k=" + encode_value("v" * 300)


@pytest.mark.parametrize("column", ["k" * 229, "é" * 40])
def test_a_column_name_too_long_for_any_folder_is_refused(column):
    from dask_manymodel.exceptions import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="too long for a folder name.*rename the column"):
        group_path([column], (1,))


def test_group_path_nests_columns():
    assert group_path(["a", "b/c"], (1, "x/y")) == "a=1/b%2Fc=x%2Fy"


@pytest.mark.parametrize(
    "value",
    [7, "7", 1.5, True, None, "a/b", pd.Timestamp("2024-01-01"), datetime.date(2024, 1, 2)],
)
def test_key_json_round_trip(value):
    back = key_from_json(key_to_json(value))
    assert back == value or (back is None and value is None)


@pytest.mark.parametrize(
    "value",
    [
        pd.Timedelta("1h"),
        pd.Timedelta("-1 days 3ns"),
        pd.Timestamp("2024-01-01 12:00", tz="Europe/Paris"),
        pd.Timestamp("2024-07-01 12:00", tz="America/New_York"),
        pd.Timestamp("2024-01-01", tz="UTC"),
        pd.Timestamp("2024-01-01").tz_localize(datetime.timezone(datetime.timedelta(hours=5, minutes=30))),
    ],
)
def test_temporal_keys_come_back_as_themselves(value):
    back = key_from_json(key_to_json(value))
    assert type(back) is type(value) and back == value
    assert str(getattr(back, "tz", None)) == str(getattr(value, "tz", None))  # the name, not only the offset
    assert encode_value(back) == encode_value(value)


@pytest.mark.parametrize(
    "pandas_value, others",
    [
        (pd.Timedelta("1h"), [datetime.timedelta(hours=1), np.timedelta64(1, "h"), np.timedelta64(3600, "s"),
                              np.timedelta64(3_600_000_000_000, "ns")]),
        (pd.Timestamp("2020-01-01"), [datetime.datetime(2020, 1, 1), np.datetime64("2020-01-01", "D"),
                                      np.datetime64("2020-01-01T00:00:00", "s"),
                                      np.datetime64("2020-01-01T00:00:00.000000000", "ns")]),
    ],
)
def test_numpy_and_python_times_find_the_pandas_folder(pandas_value, others):
    for other in others:
        assert group_path(["k"], (other,)) == group_path(["k"], (pandas_value,)), other
        assert key_from_json(key_to_json(other)) == pandas_value


def test_nan_key_json_is_null():
    assert key_to_json(math.nan) is None


@pytest.mark.parametrize("value", [math.inf, -math.inf, np.float64("inf"), np.float32("-inf")])
def test_infinite_keys_are_strict_json_and_come_back(value):
    # json.dumps of a bare inf writes Infinity, which jq, JavaScript, Go
    # and DuckDB's read_json refuse
    text = json.dumps(key_to_json(value), allow_nan=False)
    back = key_from_json(json.loads(text))
    assert type(back) is float and back == value
    assert encode_value(back) == encode_value(value)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.text(), st.integers(), st.floats(), st.none()), min_size=1, max_size=3),
    st.integers(0, 226),
)
def test_no_value_leaves_the_run_folder(values, name_length):
    by = [f"c{i}" + "n" * name_length for i in range(len(values))]
    rel = group_path(by, tuple(values))
    segments = rel.split("/")
    assert len(segments) == len(values)  # one segment per column, no extra "/"
    for col, segment in zip(by, segments):
        assert segment.startswith(f"{col}=")
        assert "\\" not in segment and "\x00" not in segment
        assert len(segment) <= len(col) + 1 + MAX_SEGMENT_CHARS
        assert len(segment.encode()) <= MAX_NAME_BYTES  # a file name, whatever the column
    root = "/base/run"
    assert posixpath.normpath(posixpath.join(root, rel)).startswith(root + "/")


@settings(max_examples=200, deadline=None)
@given(st.text(), st.text())
def test_distinct_values_get_distinct_folders(a, b):
    if a != b:
        assert encode_value(a) != encode_value(b)


def test_atomic_local_write_leaves_no_temp_files(tmp_path):
    store = RunStore(str(tmp_path), "r1")
    store.write_bytes(store.path("g=1", "x.bin"), b"hello")
    store.write_bytes(store.path("g=1", "x.bin"), b"world")
    assert (tmp_path / "r1" / "g=1" / "x.bin").read_bytes() == b"world"
    assert sorted(p.name for p in (tmp_path / "r1" / "g=1").iterdir()) == ["x.bin"]


@pytest.mark.parametrize("code", [errno.EPERM, errno.ENOTSUP])
def test_exclusive_create_on_a_drive_without_hard_links(tmp_path, monkeypatch, code):
    """FAT and exFAT drives have no hard links: os.link raised, and every new
    run there (on_existing_artifacts='error', the default) and every FileSet
    failed with 'permission denied ... check the credentials'."""

    def no_hard_links(src, dst, *args, **kwargs):
        raise OSError(code, os.strerror(code), src, None, dst)

    monkeypatch.setattr(os, "link", no_hard_links)
    store = RunStore(str(tmp_path), "r1")
    store.create_exclusive(store.path("_run.json"), b'{"a": 1}')
    assert (tmp_path / "r1" / "_run.json").read_bytes() == b'{"a": 1}'
    with pytest.raises(FileExistsError):
        store.create_exclusive(store.path("_run.json"), b'{"b": 2}')
    assert (tmp_path / "r1" / "_run.json").read_bytes() == b'{"a": 1}'
    assert os.listdir(tmp_path / "r1") == ["_run.json"]  # no temp file left


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_no_run_id_leaves_the_base_folder(run_id):
    from dask_manymodel.engine import check_run_id
    from dask_manymodel.exceptions import InvalidArgumentError

    try:
        check_run_id(run_id)
    except InvalidArgumentError:
        return
    store = RunStore("/base", run_id)
    assert posixpath.dirname(store.root) == "/base"
    assert posixpath.normpath(store.root) == store.root


@pytest.mark.parametrize("run_id", ["café", "訓練-2024", "ｒｕｎ１"])
def test_a_run_id_with_letters_outside_ascii_is_refused_saying_so(run_id):
    """The message asked for "letters", which é and 訓 are."""
    from dask_manymodel.engine import check_run_id
    from dask_manymodel.exceptions import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=r"ASCII letters \(A-Z, a-z\)"):
        check_run_id(run_id)


@pytest.mark.parametrize("value", ["../x", "/", "\\", "\x00", "%2F", "..%2F..", "a/../../b"])
def test_hostile_values_stay_in_one_segment(value):
    rel = group_path(["k"], (value,))
    assert "/" not in rel and "\\" not in rel and "\x00" not in rel
    assert rel.startswith("k=")


def test_unicode_normalization_forms_are_distinct_folders():
    import unicodedata

    nfc = unicodedata.normalize("NFC", "café")
    nfd = unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    assert encode_value(nfc) != encode_value(nfd)


def test_deleting_a_run_while_another_deleter_removes_its_files_is_no_error(tmp_path, monkeypatch):
    """Two overwrites of one run started at once (two threads of a script)
    both delete the run's old files: one's listing names folders the other
    removes before this one reaches them. The start that had taken the run
    over got a bare FileNotFoundError and marked the run FAILURE."""
    store = RunStore(str(tmp_path), "r1")
    store.write_bytes(store.path("_run.json"), b"{}")
    for group in range(3):
        store.write_bytes(store.path(f"g={group}", "model.pkl"), b"m")
        store.write_bytes(store.path(f"g={group}", "_partition.json"), b"{}")
    listing = store.fs.ls

    def listed_then_raced(path, detail=False, **kwargs):
        entries = listing(path, detail=detail, **kwargs)
        store.fs.rm(store.path("g=1"), recursive=True)  # the other start's delete, between listing and removal
        return entries

    monkeypatch.setattr(store.fs, "ls", listed_then_raced)
    store.delete_run(keep=("_run.json",))
    monkeypatch.undo()
    store.fs.invalidate_cache(store.root)
    assert [posixpath.basename(p.rstrip("/")) for p in store.fs.ls(store.root, detail=False)] == ["_run.json"]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_deleting_files_some_of_them_missing_removes_each_once(tmp_path, monkeypatch, where):
    """A resume deletes the model of every group it runs again, and a FAILED
    group has none. On local disk and memory:// fsspec's rm of the list
    removed the files up to the first missing one and raised; then each
    file was removed again, one by one (a third more calls, and an
    exception per file already gone)."""
    import uuid

    store = RunStore(str(tmp_path) if where == "local" else f"memory://deletes-{uuid.uuid4().hex}", "r1")
    files = [store.path(f"g={group}", "model.pkl") for group in range(6)]
    for path in files:
        if not path.endswith("g=3/model.pkl"):  # a FAILED group: no model
            store.write_bytes(path, b"m")
    # what removes one file: os.remove on local disk, rm_file in memory://
    owner, name = (os, "remove") if where == "local" else (store.fs, "rm_file")
    removed: list[str] = []
    remove = getattr(owner, name)

    def counted(path, *args, **kwargs):
        removed.append(path)
        return remove(path, *args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    store.delete_files(files)
    monkeypatch.undo()
    assert not any(store.fs.exists(path) for path in files)
    assert len(removed) == len(files), removed  # each once (10 calls locally, 8 in memory)


def test_a_symlink_loop_is_not_retried_and_names_its_path(tmp_path):
    """A run's _run.json that is a symlink to itself (ELOOP): no retry can
    change that, yet it was retried as a slow store's error, four reads and
    a second of backoff, before a StorageError. It fails at the first read
    now, naming the path."""
    from dask_manymodel import InvalidURLError, ManyModelRun
    from dask_manymodel.store import with_retries

    manifest = tmp_path / "r1" / "_run.json"
    manifest.parent.mkdir()
    manifest.symlink_to(manifest)
    reads = []

    def read():
        reads.append(1)
        return manifest.read_bytes()

    with pytest.raises(OSError) as caught:
        with_retries(read, what="reading it", retries=3, backoff=0)
    assert reads == [1] and caught.value.errno == errno.ELOOP
    assert caught.value.filename == str(manifest)
    loop = f"cannot read run 'r1' at .*Too many levels of symbolic links: '{manifest}'"
    with pytest.raises(InvalidURLError, match=loop):
        ManyModelRun.restore_from("r1", str(tmp_path))


def test_a_read_only_disk_is_not_retried():
    """A write refused by a disk mounted read-only (EROFS, met only when
    writing: the start's check reads permission bits) was retried four
    times with backoff before a StorageError; it is raised at once."""
    from dask_manymodel.store import with_retries

    writes = []

    def write():
        writes.append(1)
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/r1/_run.json")

    with pytest.raises(OSError) as caught:
        with_retries(write, what="writing it", retries=3, backoff=0)
    assert writes == [1] and caught.value.errno == errno.EROFS
    assert caught.value.filename == "/mnt/ro/r1/_run.json"


def test_a_store_that_is_down_costs_one_try_per_file_after_the_first(tmp_path):
    """Each file of a batch took every retry and its backoff (~0.7 s by
    default) when the store was down: a run of 400 groups took minutes to
    end, every group INTERNAL_ERROR, and 10,000 groups hours. After a file
    fails every try, the next get one each, until one is written."""
    from . import flaky_fs

    flaky_fs.register()
    log = tmp_path / "failures.log"
    down = tmp_path / "down"
    down.touch()
    store = RunStore(f"flaky://{tmp_path}/m", "r1", {"down_while": str(down), "log_path": str(log)},
                     retries=3, retry_backoff=0.001)
    names = [f"store={g}/_partition.json" for g in range(10)]
    failed = store.write_many({store.path(name): b"{}" for name in names}, atomic=False)
    assert sorted(failed) == sorted(store.path(name) for name in names)
    tried = [line.rsplit("/m/r1/", 1)[1].rstrip(")") for line in log.read_text().splitlines()]
    # the batch at once (fs.pipe, its first file), then the first file's 4 tries, the others' 1
    assert tried == names[:1] + names[:1] * 4 + names[1:]
    # a file written gives the next ones every retry again
    down.unlink()
    store = RunStore(f"flaky://{tmp_path}/m", "r1", {"fail_nth": {"store=1/": [1, 2, 3, 4, 5], "store=3/": [1]},
                                                     "count_dir": str(tmp_path)}, retries=3, retry_backoff=0.001)
    failed = store.write_many({store.path(name): b"{}" for name in names[:4]}, atomic=False)
    # store=1 fails the batch's write and its own 4 tries; store=2, tried once, is written; so
    # store=3 has every try again, and its second is written
    assert list(failed) == [store.path(names[1])]
    assert [(tmp_path / "m" / "r1" / name).exists() for name in names[:4]] == [True, False, True, True]


def test_a_status_the_store_could_not_read_is_not_said_to_be_there(tmp_path):
    """With the store down, reading a group's status said "the file is
    there ... Make the file readable (the store's permissions, or the
    disk)": neither was known, and the advice did not fit an outage."""
    from dask_manymodel import StorageError

    from . import flaky_fs

    flaky_fs.register()
    down = tmp_path / "down"
    down.touch()
    store = RunStore(f"flaky://{tmp_path}/m", "r1", {"down_while": str(down)}, retries=1, retry_backoff=0.001)
    with pytest.raises(StorageError) as raised:
        store.read_statuses(["store=0"])
    message = str(raised.value)
    assert "store=0/_partition.json of run 'r1'" in message and "the store is down" in message
    assert "it may be there, so the group's outcome is not known" in message
    assert "Try again once the store answers" in message and "the file is there" not in message


def test_a_file_refused_for_itself_leaves_the_next_files_their_retries(tmp_path):
    """A file refused at once for what it is (not a directory, permission
    denied: retrying cannot change it) is no sign the store is down, yet
    the batch's next files lost their retries, and one that met a transient
    failure was given up (INTERNAL_ERROR) where a second try wrote it."""
    from dask_manymodel import StorageError

    from . import flaky_fs

    flaky_fs.register()
    (tmp_path / "m" / "r1").mkdir(parents=True)
    (tmp_path / "m" / "r1" / "a-file").write_text("")
    store = RunStore(f"flaky://{tmp_path}/m", "r1", {"fail_nth": {"store=1/": [1]}, "count_dir": str(tmp_path)},
                     retries=3, retry_backoff=0.001)
    refused, next_one = store.path("a-file/_partition.json"), store.path("store=1/_partition.json")
    failed = store.write_many({refused: b"{}", next_one: b"{}"}, atomic=False)
    assert list(failed) == [refused] and not isinstance(failed[refused], StorageError)  # no retries spent
    assert (tmp_path / "m" / "r1" / "store=1" / "_partition.json").read_bytes() == b"{}"
