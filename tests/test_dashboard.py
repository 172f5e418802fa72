"""The Dask dashboard, loaded in headless Chromium, shows a manymodel-train bar
that fills as the run's tasks finish, apart from the shuffle's bars."""

from __future__ import annotations

import functools
import logging
import os

import dask.dataframe as dd
import distributed
import pytest

import dask_manymodel  # noqa: F401  (registers ddf.manymodel)
from dask_manymodel import ExecutionOptions, RunStatus

from .conftest import group_zero_held, make_frame

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (Debian's chromium package; .ci/run installs it)"
)
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
N_TASKS = 4

# The /status page's "Progress" plot is the Bokeh figure named task_progress;
# its bar labels are drawn on a canvas from the "show-name" column of the
# figure's data source, so that column is what the page shows. Returns the
# bars and the figure's box on the page, or null until the plot has data.
PROGRESS_BARS_JS = """
() => {
  if (!window.Bokeh || !Bokeh.documents) return null;
  const models = [...Bokeh.documents].flatMap(doc => [...doc._all_models.values()]);
  const figure = models.find(model => model.name === "task_progress");
  if (!figure) return null;
  let bars = null;
  for (const renderer of figure.renderers) {
    const data = renderer.data_source ? renderer.data_source.data : null;
    const column = key => data instanceof Map ? data.get(key) : (data || {})[key];
    if (column("show-name") && column("show-name").length) {
      bars = ["name", "show-name", "done", "all"].reduce(
        (out, key) => Object.assign(out, {[key]: Array.from(column(key))}), {});
      break;
    }
  }
  if (!bars) return null;
  // the figure's view: its element must be laid out inside the window
  const seen = new Set();
  let box = null;
  const walk = view => {
    if (!view || seen.has(view) || box) return;
    seen.add(view);
    if (view.model === figure) {
      const rect = view.el.getBoundingClientRect();
      box = {width: rect.width, height: rect.height, top: rect.top, left: rect.left};
    }
    for (const child of (view.child_views || [])) walk(child);
  };
  // Bokeh.index: a ViewManager (bokeh 3.3+; roots a method or a list), a plain object before
  const roots = typeof Bokeh.index.roots === "function" ? Bokeh.index.roots() : (Bokeh.index.roots || Object.values(Bokeh.index));
  for (const root of roots) walk(root);
  return Object.assign(bars, {box});
}
"""


def bar(bars: dict | None, name: str) -> dict | None:
    """The row of bar ``name`` in the plot's data, as {field: value}."""
    if not bars or name not in bars["name"]:
        return None
    row = bars["name"].index(name)
    return {key: bars[key][row] for key in ("name", "show-name", "done", "all")}


def test_progress_page_shows_the_run_bar_filling(tmp_path):
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
        silence_logs=logging.ERROR,
    ) as cluster, distributed.Client(cluster) as client, sync_api.sync_playwright() as playwright:
        profile = tmp_path / "chromium-profile"
        profile.mkdir()  # empty: no state from any earlier browser
        browser = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
        )
        try:
            page = browser.new_page()
            # load the page before the run starts, so that none of the run is missed
            page.goto(client.dashboard_link, wait_until="domcontentloaded")  # .../status
            assert page.url.endswith("/status")

            ddf = dd.from_pandas(make_frame(n_groups=40, rows=2), npartitions=2)
            gate = str(tmp_path / "release")
            run = ddf.manymodel.train(functools.partial(group_zero_held, gate), by="store",
                                      url=str(tmp_path / "m"), run_id="r1",
                                      execution_options=ExecutionOptions(npartitions=N_TASKS))

            # wait_for_function polls inside the page until the condition holds or the
            # deadline passes; first the bar partly filled (some of the run's tasks done)
            partly = page.wait_for_function(
                f"() => {{ const b = ({PROGRESS_BARS_JS})(); if (!b) return null;"
                f" const i = b['show-name'].indexOf('manymodel-train');"
                f" if (i < 0) return null; const done = parseInt(b.done[i]);"
                f" return done > 0 && done < b.all[i] ? b : null; }}",
                polling=100, timeout=60_000,
            ).json_value()
            page.screenshot(path=str(tmp_path / "dashboard.png"))
            ours = bar(partly, "manymodel-train")
            assert ours["show-name"] == "manymodel-train"  # the label drawn on the bar, not cut
            assert ours["all"] == N_TASKS and 0 < int(ours["done"].split(" / ")[0]) < N_TASKS
            box = partly["box"]
            assert box and box["width"] > 100 and box["height"] > 100, box
            assert 0 <= box["top"] < 900 and 0 <= box["left"] < 1400, box
            # the shuffle has bars of its own; ours counts only the run's tasks
            assert any("shuffle" in name for name in partly["name"]), partly["name"]
            assert sum(name.startswith("manymodel-train") for name in partly["name"]) == 1

            open(gate, "w").close()  # group 0 may finish now
            full = page.wait_for_function(
                f"() => {{ const b = ({PROGRESS_BARS_JS})(); if (!b) return null;"
                f" const i = b['show-name'].indexOf('manymodel-train');"
                f" return i >= 0 && b.done[i] === '{N_TASKS} / {N_TASKS}' ? b : null; }}",
                polling=100, timeout=60_000,
            ).json_value()
            assert bar(full, "manymodel-train")["done"] == f"{N_TASKS} / {N_TASKS}"
        finally:
            browser.close()
        assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
