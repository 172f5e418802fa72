"""The Dask dashboard, loaded in headless Chromium, shows a manymodel-train bar."""

from __future__ import annotations

import logging
import os
import time

import dask.dataframe as dd
import distributed
import pytest

import dask_manymodel  # noqa: F401
from dask_manymodel import ExecutionOptions, RunStatus

from .conftest import make_frame

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed")
sync_api = pytest.importorskip("playwright.sync_api")

# names of every task group the dashboard's Bokeh document holds in its data sources
BAR_NAMES_JS = """
() => {
  const names = [];
  for (const doc of (window.Bokeh ? Bokeh.documents : [])) {
    const models = doc._all_models ? doc._all_models.values() : doc.all_models;
    for (const model of models) {
      const data = model.data;
      if (!data || typeof data !== "object") continue;
      const column = data instanceof Map ? data.get("name") : data.name;
      if (column) names.push(...Array.from(column));
    }
  }
  return names;
}
"""


def slow_group(data, ctx):
    time.sleep(0.15)  # simulated training, so that the run is visible for a while
    return len(data)


def test_progress_page_shows_the_run(tmp_path):
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
        silence_logs=logging.ERROR,
    ) as cluster, distributed.Client(cluster) as client:
        ddf = dd.from_pandas(make_frame(n_groups=100, rows=2), npartitions=2)
        run = ddf.manymodel.train(slow_group, by="store", url=str(tmp_path / "m"), run_id="r1",
                                  execution_options=ExecutionOptions(npartitions=4))
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM,
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
            )
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(client.dashboard_link, wait_until="domcontentloaded")  # .../status
            names: list[str] = []
            deadline = time.monotonic() + 60
            while "manymodel-train" not in names:
                assert time.monotonic() < deadline, f"no manymodel-train bar; bars: {sorted(set(names))}"
                page.wait_for_timeout(200)  # the page polls the scheduler; look again shortly
                names = page.evaluate(BAR_NAMES_JS)
            page.screenshot(path=str(tmp_path / "dashboard.png"))
            browser.close()
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
        # the run's bar is its own, apart from the shuffle's
        assert any(name != "manymodel-train" for name in names)
        assert run.wait(show_progress=False) == RunStatus.SUCCESS
