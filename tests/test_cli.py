"""The ``dask-manymodel`` command line: tables, logs, exit codes, the demo."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import dask_manymodel  # noqa: F401  (registers ddf.manymodel)
from dask_manymodel.cli import main

from .conftest import fit_line

CLI = [sys.executable, "-m", "dask_manymodel.cli"]


def flaky(data, ctx):
    print(f"hello from {ctx.partition_id}")
    if ctx.partition_id in (2, 3):
        raise ValueError(f"group {ctx.partition_id} is broken\nsecond line of the error")
    return fit_line(data, ctx)


def scores(data, model, ctx):
    return data.to_pandas().assign(pred=1.0)


@pytest.fixture
def runs(client, ddf, store_url):
    """A training run with two FAILED groups, and an inference run on it."""
    ddf.manymodel.train(flaky, by="store", url=store_url, run_id="r1").wait(show_progress=False)
    ddf.manymodel.predict(scores, by="store", url=store_url, training_run_id="r1", run_id="s1").wait(
        show_progress=False
    )
    return store_url


def lines_of(text: str) -> list[list[str]]:
    return [line.split() for line in text.strip().splitlines()]


def test_runs_lists_every_run_as_a_table(runs, capsys):
    assert main(["runs", runs]) == 0
    table = lines_of(capsys.readouterr().out)
    assert table[0] == ["run_id", "kind", "status", "groups", "created"]
    assert [row[:4] for row in table[1:]] == [
        ["r1", "train", "PARTIAL_FAILURE", "12"],
        ["s1", "predict", "PARTIAL_FAILURE", "12"],
    ]
    assert all(row[4].startswith("20") and "T" in row[4] for row in table[1:])  # ISO time
    # in UTC, as stored, and saying so: read as local time it would be hours off
    created = json.loads(Path(runs, "r1", "_run.json").read_text())["created"]
    assert created.endswith("+00:00")
    assert table[1][4] == created[:19] + "Z"


def test_runs_of_a_runs_own_folder_says_so(runs, capsys):
    # `runs URL/r1` said "no runs at URL/r1", as if the run were gone
    assert main(["runs", f"{runs}/r1"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"no runs at {runs}/r1: it is itself the folder of a run; list the runs beside it with "
        f"`dask-manymodel runs {runs}`, or see this one with `dask-manymodel show {runs} r1`"
    )


def test_runs_agrees_with_show_when_the_client_died_before_the_end(runs, capsys):
    """A client killed after its tasks had finished every group left
    _run.json IN_PROGRESS: runs said IN_PROGRESS for good, show the status
    the groups tell."""
    path = os.path.join(runs, "r1", "_run.json")
    with open(path) as f:
        manifest = json.load(f)
    with open(path, "w") as f:
        json.dump({**manifest, "status": "IN_PROGRESS", "finished": None}, f)
    assert main(["runs", runs]) == 0
    assert lines_of(capsys.readouterr().out)[1][:3] == ["r1", "train", "PARTIAL_FAILURE"]
    assert main(["show", runs, "r1"]) == 0
    assert "PARTIAL_FAILURE" in capsys.readouterr().out.splitlines()[0]


def test_runs_skips_foreign_folders_and_survives_a_damaged_manifest(runs, capsys):
    os.makedirs(os.path.join(runs, "not-a-run"))
    with open(os.path.join(runs, "s1", "_run.json"), "w") as f:
        f.write("{ half a manifest")
    assert main(["runs", runs]) == 0
    out = capsys.readouterr().out
    assert "not-a-run" not in out
    assert "s1" in out and "unreadable _run.json" in out and "r1" in out


def test_runs_lists_a_run_whose_manifest_cannot_be_read(runs, capsys):
    """A _run.json that is there but cannot be read (access denied) was
    read as missing: the run was left out of the list, as a folder that
    holds no run."""
    from . import flaky_fs

    flaky_fs.register()
    denied = json.dumps({"deny_reads": ["r1/_run.json"]})
    assert main(["runs", f"flaky://{runs}", "--storage-options", denied]) == 0
    table = lines_of(capsys.readouterr().out)
    assert table[0] == ["run_id", "kind", "status", "groups", "created", "note"]
    assert table[1][:3] == ["r1", "unreadable", "_run.json"] and "PermissionError:" in table[1]
    assert table[2][:3] == ["s1", "predict", "PARTIAL_FAILURE"]


def test_runs_leaves_out_a_folder_that_cannot_be_entered(runs, capsys):
    """A URL at a disk's root holds lost+found, root's and closed to
    others: its _run.json could not be read, and the list showed it as a
    run, "lost+found  unreadable _run.json  PermissionError: ...". A folder
    that cannot be listed is not known to hold a run: left out, as before."""
    from . import flaky_fs

    flaky_fs.register()
    os.mkdir(os.path.join(runs, "lost+found"))
    denied = json.dumps({"deny_reads": ["lost+found"]})
    assert main(["runs", f"flaky://{runs}", "--storage-options", denied]) == 0
    table = lines_of(capsys.readouterr().out)
    assert [row[0] for row in table] == ["run_id", "r1", "s1"]
    assert "note" not in table[0]


def test_runs_says_which_folders_it_could_not_open(runs, capsys):
    """Runs another user wrote under umask 077 (folders of mode 700) were
    left out as lost+found is, and `runs` said "no runs at URL" as if they
    were not there. A closed folder whose name is no run_id (lost+found)
    is still left out without a word."""
    from . import flaky_fs

    flaky_fs.register()
    os.mkdir(os.path.join(runs, "lost+found"))
    denied = json.dumps({"deny_reads": ["lost+found", "/r1", "/s1"]})
    assert main(["runs", f"flaky://{runs}", "--storage-options", denied]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"no runs at flaky://{runs}\n"
    assert captured.err == (
        f"dask-manymodel: 2 folder(s) at flaky://{runs} cannot be opened here (permission denied), "
        f"so they are not listed, runs or not: r1, s1\n"
    )


@pytest.mark.parametrize("command", [["show"], ["logs", "1"]])
def test_show_and_logs_of_a_damaged_run_exit_2_with_a_message(runs, capsys, command):
    with open(os.path.join(runs, "s1", "_run.json"), "w") as f:
        f.write("{ half a manifest")
    assert main([command[0], runs, "s1", *command[1:]]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"dask-manymodel: error: run 's1' at {runs} cannot be read: its _run.json is damaged")
    assert captured.out == ""


def test_runs_of_an_empty_folder(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"no runs at {tmp_path}"


def test_show_counts_slowest_and_failed_groups(runs, capsys):
    assert main(["show", runs, "r1", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"run r1 (train) at {runs}: PARTIAL_FAILURE\n")
    assert ["DONE", "10"] in lines_of(out) and ["FAILED", "2"] in lines_of(out)
    slowest = out.split("slowest groups:\n")[1].split("\n\n")[0].splitlines()
    assert slowest[0].split() == ["group", "seconds", "rows"] and len(slowest) == 2  # --top 1
    failed = out.split("failed groups (2):\n")[1]
    assert "ValueError: group 2 is broken" in failed and "second line" not in failed
    assert "... and 1 more" in failed
    assert main(["show", runs, "r1", "--top", "2"]) == 0
    assert "... and" not in capsys.readouterr().out  # both failed groups listed: none more


def test_show_an_inference_run(runs, capsys):
    assert main(["show", runs, "s1"]) == 0
    out = capsys.readouterr().out
    assert "run s1 (predict)" in out and "has no model in training run 'r1'" in out


def test_logs_of_a_failed_and_a_done_group(runs, capsys):
    assert main(["logs", runs, "r1", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("group 2: FAILED\nerror: ValueError: group 2 is broken\n")
    assert "hello from 2" in out and "hello from 5" not in out
    assert "Traceback (most recent call last)" in out and "second line of the error" in out
    assert main(["logs", runs, "r1", "5"]) == 0
    out = capsys.readouterr().out
    assert out == "group 5: DONE\nhello from 5\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["show", "{url}", "missing"], "no run 'missing' at"),
        (["logs", "{url}", "missing", "1"], "no run 'missing' at"),
        (["logs", "{url}", "r1", "99"], "run 'r1' has no group '99'"),
        (["runs", "{url}/does-not-exist"], "the location does not exist"),
        (["show", "{url}/does-not-exist", "r1"], "the location does not exist"),
        (["runs", "nosuchproto://x"], "Protocol not known: nosuchproto"),
        (["runs", "{url}", "--storage-options", "[1]"], "--storage-options must be a JSON object"),
        (["runs", "{url}", "--storage-options", "{{bad"], "--storage-options must be a JSON object, got '{bad': Expecting"),
        (["show", "{url}", "../r1"], "run_id '../r1' is not allowed"),
        # runs listed "no runs at" the file and exited 0; show said NotADirectoryError
        (["runs", "{url}/r1/_run.json"], "r1/_run.json' is a file, not a folder of runs"),
        (["show", "{url}/r1/_run.json", "r1"], "r1/_run.json' is a file, not a folder of runs"),
    ],
)
def test_bad_input_exits_2_with_a_message(runs, capsys, argv, message):
    assert main([arg.format(url=runs) for arg in argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("dask-manymodel: error: ") and message in captured.err
    assert captured.out == ""


def test_unreachable_url_exits_2(capsys):
    pytest.importorskip("s3fs")
    # nothing listens on port 9: the connection is refused at once
    options = {"anon": True, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
               "config_kwargs": {"retries": {"max_attempts": 1}}}
    assert main(["runs", "s3://bucket/models", "--storage-options", json.dumps(options)]) == 2
    err = capsys.readouterr().err
    assert "cannot reach 's3://bucket/models'" in err and "EndpointConnectionError" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage: dask-manymodel" in capsys.readouterr().err


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"dask-manymodel {dask_manymodel.__version__}"


def test_as_a_module_and_a_console_script(runs):
    out = subprocess.run([*CLI, "runs", runs], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "r1" in out.stdout
    out = subprocess.run([*CLI, "show", runs, "nope"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no run 'nope'" in out.stderr and "Traceback" not in out.stderr
    # the console script that `pip install` puts beside the interpreter
    script = shutil.which("dask-manymodel", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("dask-manymodel is not installed as a console script in this environment")
    out = subprocess.run([script, "logs", runs, "r1", "3"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("group 3: FAILED")


def test_demo(tmp_path):
    url = str(tmp_path / "demo")
    out = subprocess.run(
        [*CLI, "demo", "--groups", "50", "--rows", "20", "--url", url],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Dask dashboard: http" in out.stdout
    assert "training run 'demo-train': SUCCESS" in out.stdout
    assert "inference run 'demo-scores': SUCCESS" in out.stdout
    assert "rows scored: 1000" in out.stdout  # 50 groups x 20 rows
    assert sorted(os.listdir(url)) == ["demo-scores", "demo-train"]
    assert main(["show", url, "demo-train"]) == 0


def test_the_demo_reads_the_inference_output_once_for_its_numbers():
    """len() of the output, then the error's mean, read every output file twice."""
    import dask

    from dask_manymodel.demo import rows_and_rmse

    reads = []

    def read(number):
        reads.append(number)
        return pd.DataFrame({"y": [1.0, 2.0], "pred": [1.0, 2.0 + number]})

    predictions = dd.from_map(read, range(3), meta=pd.DataFrame({"y": [0.0], "pred": [0.0]}).iloc[:0])
    with dask.config.set(scheduler="sync"):
        rows, rmse = rows_and_rmse(predictions)
    assert rows == 6 and rmse == pytest.approx(np.sqrt((0 + 1 + 4) / 6))
    assert sorted(reads) == [0, 1, 2]


@pytest.mark.parametrize("failing", ["demo-train", "demo-scores"])
def test_demo_exits_1_when_either_run_is_not_a_success(tmp_path, monkeypatch, capsys, failing):
    """The store refuses one group's files (in the demo's own worker
    processes): that run is a PARTIAL_FAILURE, and the command exits 1. An
    inference run that was not a SUCCESS exited 0."""
    import fsspec

    from . import flaky_fs

    flaky_fs.register()
    monkeypatch.setitem(fsspec.config.conf, "flaky", {"fail_paths": [f"{failing}/store=3/"]})
    url = f"flaky://{tmp_path}/demo"
    assert main(["demo", "--groups", "6", "--rows", "5", "--workers", "1", "--url", url]) == 1
    out = capsys.readouterr().out
    # (a group without a model fails in the inference run too)
    training = "PARTIAL_FAILURE" if failing == "demo-train" else "SUCCESS"
    assert f"training run 'demo-train': {training}" in out
    assert "inference run 'demo-scores': PARTIAL_FAILURE" in out


def test_demo_that_cannot_make_its_folder_says_it_cannot_write_there(capsys):
    """/proc takes no new folder (os.makedirs: FileNotFoundError, even as
    root): the demo said "cannot read '/proc/demo'", as if something were
    missing there to read."""
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here")
    assert main(["demo", "--groups", "2", "--rows", "5", "--workers", "1", "--url", "/proc/manymodel-demo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dask-manymodel: error: cannot write to '/proc/manymodel-demo'"), err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "url, message",
    [
        ("nosuchproto://demo", "cannot open url 'nosuchproto://demo': Protocol not known: nosuchproto"),
        ("memory://demo", "'memory://demo' is in-memory and private to each process, and the demo's workers"),
        ("{tmp_path}/a-file/demo", "cannot reach '{tmp_path}/a-file/demo': NotADirectoryError"),
    ],
)
def test_demo_refuses_a_bad_url_before_its_cluster_starts(tmp_path, capsys, url, message):
    """The demo started its LocalCluster (seconds of worker processes, and
    'Dask dashboard: ...' printed) before its first run refused the URL."""
    (tmp_path / "a-file").write_text("")
    url, message = url.format(tmp_path=tmp_path), message.format(tmp_path=tmp_path)
    assert main(["demo", "--groups", "2", "--rows", "5", "--workers", "1", "--url", url]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no cluster: it prints its dashboard first
    assert captured.err.startswith(f"dask-manymodel: error: {message}"), captured.err


def test_an_os_error_reading_a_run_exits_2_with_the_file_and_error(runs, capsys):
    """A run's _groups.json that is a folder (an OSError the library does
    not turn into its own errors; root reads past permissions): show and
    logs say which file and what failed, exit 2, and print no traceback."""
    groups = os.path.join(runs, "r1", "_groups.json")
    os.remove(groups)
    os.mkdir(groups)
    for argv in (["show", runs, "r1"], ["logs", runs, "r1", "3"]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == (
            f"dask-manymodel: error: cannot read {runs!r}: [Errno 21] Is a directory: {groups!r}\n"
        )


@pytest.mark.parametrize(
    "option, value", [("--groups", "0"), ("--groups", "-3"), ("--rows", "0"), ("--workers", "0")]
)
def test_demo_refuses_counts_below_one_before_starting(tmp_path, capsys, option, value):
    url = str(tmp_path / "demo")
    assert main(["demo", "--url", url, "--groups", "3", "--rows", "5", option, value]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"dask-manymodel: error: {option} must be at least 1, got {value}\n"
    assert captured.out == "" and not os.path.exists(url)  # no cluster was started


def test_show_refuses_a_negative_top(runs, capsys):
    assert main(["show", runs, "r1", "--top", "-1"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "dask-manymodel: error: --top must be at least 0, got -1\n"
    assert captured.out == ""


def test_runs_names_a_copied_run_by_its_folder(runs, capsys):
    shutil.copytree(os.path.join(runs, "r1"), os.path.join(runs, "r1-backup"))
    assert main(["runs", runs]) == 0
    table = lines_of(capsys.readouterr().out)
    assert table[0] == ["run_id", "kind", "status", "groups", "created", "note"]
    assert [row[0] for row in table[1:]] == ["r1", "r1-backup", "s1"]  # the ids show and logs take
    assert " ".join(table[2][5:]) == "_run.json says run_id 'r1' (a copied folder?)"
    assert len(table[1]) == len(table[3]) == 5  # no note where folder and run_id agree
    assert main(["show", runs, "r1-backup"]) == 0
    assert capsys.readouterr().out.startswith("run r1-backup (train)")


def test_a_closed_output_ends_quietly_with_141(runs):
    # a pipe whose reader has gone before anything is written, as after `| head -1`
    read, write = os.pipe()
    os.close(read)
    try:
        out = subprocess.run(
            [*CLI, "show", runs, "r1"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=60
        )
    finally:
        os.close(write)
    assert (out.returncode, out.stderr) == (141, "")


def say_key(data, ctx):
    print(f"key {ctx.partition_id!r}")
    return 1


@pytest.fixture
def keyed_runs(client, store_url):
    """Runs keyed by floats, by times and by two columns, each with a null group."""
    frames = {
        "floats": pd.DataFrame({"k": [1.0, 2.0, np.nan]}),
        "times": pd.DataFrame({"k": pd.to_datetime(["2020-01-01 00:00", "2020-01-02 10:30", None])}),
        "pairs": pd.DataFrame({"k": ["x/y", "sp ace", None], "n": [1, 2, 1]}),
    }
    for run_id, frame in frames.items():
        by = list(frame.columns)
        ddf = dd.from_pandas(frame.assign(v=1), npartitions=1)
        ddf.manymodel.train(say_key, by=by, url=store_url, run_id=run_id).wait(show_progress=False)
    return store_url


@pytest.mark.parametrize(
    "run_id, shown",
    [
        ("floats", {"1.0", "2.0", "None"}),
        ("times", {"2020-01-01T00:00:00", "2020-01-02T10:30:00", "None"}),
        ("pairs", {"x/y 1", "'sp ace' 2", "None 1"}),
    ],
)
def test_logs_takes_each_group_as_show_prints_it(keyed_runs, capsys, run_id, shown):
    assert main(["show", keyed_runs, run_id, "--top", "10"]) == 0
    slowest = capsys.readouterr().out.split("slowest groups:\n")[1].splitlines()[1:]
    groups = [line.rsplit(None, 2)[0] for line in slowest]  # less seconds and rows
    assert set(groups) == shown  # plain values, quoted as a shell needs
    for group in groups:
        assert main(["logs", keyed_runs, run_id, *shlex.split(group)]) == 0
        assert capsys.readouterr().out.startswith(f"group {group}: DONE\nkey ")


@pytest.mark.parametrize(
    "run_id, spellings, group",
    [
        ("floats", [["1"], ["1.0"]], "1.0"),  # equal values of another type: one group
        ("floats", [["nan"], ["NaN"], ["None"], ["<NA>"]], "None"),
        ("times", [["2020-01-01"], ["2020-01-01 00:00:00"], ["2020-01-01T00:00:00"]], "2020-01-01T00:00:00"),
        ("times", [["2020-01-02T10:30"]], "2020-01-02T10:30:00"),
        ("times", [["NaT"], ["None"]], "None"),
        ("pairs", [["nan", "1.0"], ["None", "1"]], "None 1"),
    ],
)
def test_logs_reads_a_value_as_its_columns_type(keyed_runs, capsys, run_id, spellings, group):
    for words in spellings:
        assert main(["logs", keyed_runs, run_id, *words]) == 0, words
        assert capsys.readouterr().out.startswith(f"group {group}: DONE\n"), words


def test_logs_of_an_unknown_group_lists_groups_as_show_prints_them(keyed_runs, capsys):
    assert main(["logs", keyed_runs, "pairs", "x/y", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dask-manymodel: error: run 'pairs' has no group 'x/y' '2' ")
    listed = err.split("groups include: ")[1].split("; ")[0].split(", ")
    assert sorted(listed) == ["'sp ace' 2", "None 1", "x/y 1"]
    assert main(["logs", keyed_runs, "pairs", "x/y"]) == 2
    assert "has 2 partition_by columns ['k', 'n']: give one value for each, got 1" in capsys.readouterr().err


# clears the screen, retitles the window; \x9b is the one-byte CSI of C1
TERMINAL_CONTROL = "\x1b[2J\x1b]0;pwned\x07\x9b"


def fail_naming_the_key(data, ctx):
    print(f"hello from {ctx.partition_id}\rover", file=sys.stderr)
    if ctx.partition_id != "ok":
        raise ValueError(f"bad group {ctx.partition_id}")  # str(), not a repr: the key as it is
    return 1


def test_control_characters_of_stored_text_never_reach_the_terminal(client, store_url):
    """A group value, an error, captured logs, a folder's or a _run.json's
    text that holds ESC ... drove the terminal of whoever ran show, logs or
    runs on the run: printed raw."""
    ddf = dd.from_pandas(pd.DataFrame({"k": [TERMINAL_CONTROL, "ok"] * 3, "x": range(6)}), npartitions=2)
    ddf.manymodel.train(fail_naming_the_key, by="k", url=store_url, run_id="r1").wait(show_progress=False)
    # a folder of the store and a _run.json written by someone else
    os.makedirs(os.path.join(store_url, "x" + TERMINAL_CONTROL))
    manifest = json.loads(Path(store_url, "r1", "_run.json").read_text())
    with open(os.path.join(store_url, "x" + TERMINAL_CONTROL, "_run.json"), "w") as f:
        json.dump(manifest | {"kind": TERMINAL_CONTROL, "run_id": "x" + TERMINAL_CONTROL}, f)
    outputs = {}
    for command in (["runs", store_url], ["show", store_url, "r1"]):
        out = subprocess.run(CLI + command, capture_output=True, text=True, check=True)
        outputs[command[0]] = out.stdout
    assert r"x\x1b[2J\x1b]0;pwned\x07\x9b" in outputs["runs"]
    failed = outputs["show"].split("failed groups (1):\n")[1]
    word = r"$'\x1b[2J\x1b]0;pwned\x07\u009b'"  # bash's quoting: copied after logs, it names the group
    assert failed == f"  {word}: FAILED: ValueError: bad group " + r"\x1b[2J\x1b]0;pwned\x07\x9b" + "\n"
    out = subprocess.run(
        ["bash", "-c", shlex.join(CLI + ["logs", store_url, "r1"]) + " " + word],
        capture_output=True, text=True, check=True, env=os.environ | {"LC_ALL": "C.UTF-8"},
    ).stdout
    assert out.startswith(f"group {word}: FAILED\nerror: ValueError: bad group " + r"\x1b[2J")
    assert r"hello from \x1b[2J\x1b]0;pwned\x07\x9b\rover" + "\n" in out  # logs: newlines kept
    assert out.rstrip("\n").endswith(r"ValueError: bad group \x1b[2J\x1b]0;pwned\x07\x9b")
    for text in [*outputs.values(), out]:
        assert not set(text) & (set(map(chr, range(32))) - {"\n"} | set(map(chr, range(0x7f, 0xa0))))


def say_in_other_scripts(data, ctx):
    print(f"key {ctx.partition_id}: température 20 °C")
    print("a file name that is not UTF-8:", os.fsdecode(b"caf\xe9.csv"))  # a surrogate
    return 1


def test_show_and_logs_in_the_c_locale_and_with_surrogates(client, store_url):
    """Under LANG=C (cron, a bare container, ssh without a locale) stdout is
    ASCII: show and logs died with a UnicodeEncodeError traceback on a group
    value or a log line in another script, and logs took the value typed
    (UTF-8 bytes, read as surrogates) for no group. On a UTF-8 stdout, logs
    died on the surrogate that a group printed."""
    frame = pd.DataFrame({"k": ["店舗", "plain"], "v": [1, 2]})
    dd.from_pandas(frame, npartitions=1).manymodel.train(
        say_in_other_scripts, by="k", url=store_url, run_id="r1"
    ).wait(show_progress=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONIOENCODING", "PYTHONUTF8"))}
    c_locale = {**env, "LC_ALL": "C", "PYTHONUTF8": "0"}
    out = subprocess.run([*CLI, "show", store_url, "r1"], capture_output=True, env=c_locale, timeout=60)
    assert (out.returncode, out.stderr) == (0, b""), out.stderr.decode(errors="replace")
    assert b"\\u5e97\\u8217" in out.stdout
    for group in ("店舗", "plain"):
        out = subprocess.run([*CLI, "logs", store_url, "r1", group], capture_output=True, env=c_locale, timeout=60)
        assert (out.returncode, out.stderr) == (0, b""), out.stderr.decode(errors="replace")
        assert b": DONE" in out.stdout and b"temp\\xe9rature 20 \\xb0C" in out.stdout
    strict = {**env, "PYTHONIOENCODING": "utf-8:strict"}  # as on a desktop's en_US.UTF-8
    out = subprocess.run([*CLI, "logs", store_url, "r1", "店舗"], capture_output=True, env=strict, timeout=60)
    assert (out.returncode, out.stderr) == (0, b""), out.stderr.decode(errors="replace")
    # the surrogate the group printed is stored as its escape (see run_group's unicode_text)
    assert "group '店舗': DONE".encode() in out.stdout and b"caf\\udce9.csv" in out.stdout


def test_the_cli_runs_with_docstrings_stripped(runs):
    """``python -OO`` (or PYTHONOPTIMIZE=2, as some locked-down images set,
    which the console script obeys too) strips docstrings: every command died
    with "AttributeError: 'NoneType' object has no attribute 'splitlines'"
    while the parser was built from the module docstring."""
    command = [sys.executable, "-OO", "-m", "dask_manymodel.cli"]
    out = subprocess.run([*command, "logs", runs, "r1", "3"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("group 3: FAILED")
    out = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage: dask-manymodel" in out.stdout


def test_show_tells_the_null_group_from_the_text_none(client, store_url, capsys):
    """A string column with both the text "None" and a null: show printed both
    groups as `None`, and `logs ... None` reached the text one only."""
    frame = pd.DataFrame({"k": ["None", None, "a", None], "n": [1, 1, 1, 2]})
    ddf = dd.from_pandas(frame.assign(v=1), npartitions=1)
    ddf.manymodel.train(say_key, by=["k", "n"], url=store_url, run_id="r1").wait(show_progress=False)
    assert main(["show", store_url, "r1", "--top", "10"]) == 0
    slowest = capsys.readouterr().out.split("slowest groups:\n")[1].splitlines()[1:]
    groups = sorted(line.rsplit(None, 2)[0] for line in slowest)
    assert groups == ["NaN 1", "NaN 2", "None 1", "a 1"]
    keys = {}
    for group in groups:
        assert main(["logs", store_url, "r1", *shlex.split(group)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"group {group}: DONE\n")
        keys[group] = out.splitlines()[1]
    assert keys == {
        "NaN 1": "key (None, 1)", "NaN 2": "key (None, 2)", "None 1": "key ('None', 1)", "a 1": "key ('a', 1)"
    }
    assert main(["logs", store_url, "r1", "x", "1"]) == 2  # the groups listed as show prints them
    assert "NaN 2" in capsys.readouterr().err


def test_logs_takes_a_group_value_that_starts_with_a_dash(client, store_url, capsys):
    """show printed the text group -x as `-x`; `logs URL RUN_ID -x` copied from
    it failed with "the following arguments are required: group" (argparse
    read -x as an option), and --storage-options after the group still works."""
    ddf = dd.from_pandas(pd.DataFrame({"k": ["-x", "--top", "-1", "a"], "v": 1}), npartitions=1)
    ddf.manymodel.train(say_key, by="k", url=store_url, run_id="r1").wait(show_progress=False)
    for words in (["-x"], ["--top"], ["-1"], ["--", "-x"], ["-x", "--storage-options", "{}"]):
        assert main(["logs", store_url, "r1", *words]) == 0, words
        value = [w for w in words if w not in ("--", "--storage-options", "{}")][0]
        assert capsys.readouterr().out.startswith(f"group {value}: DONE\nkey {value!r}\n"), words
    assert main(["logs", "--storage-options", "[1]", store_url, "r1", "-x"]) == 2  # still read as the option
    assert "--storage-options must be a JSON object" in capsys.readouterr().err
