"""Writes the example notebooks from the cells below, with no outputs.

Edit the cells here and run ``python notebooks/make_notebooks.py``; the
notebooks stay reviewable in git and a test executes each one.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

SETUP = '''import logging, tempfile
import numpy as np, pandas as pd
import dask.dataframe as dd
import distributed
import dask_manymodel  # registers ddf.manymodel

cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0",
                                   silence_logs=logging.ERROR)
client = distributed.Client(cluster)
client.register_plugin(dask_manymodel.IgnoreInterrupts())  # the stop button would kill the workers
url = tempfile.mkdtemp()  # any fsspec URL works: s3://bucket/models, gs://..., memory:// (threads only)
print("dashboard:", client.dashboard_link)'''

NOTEBOOKS = {
    "01_quickstart.ipynb": [
        "# Quickstart: one model per store\nTrain, watch, inspect, predict. Open the dashboard link to see the `manymodel-train` bar.",
        SETUP,
        '''rng = np.random.default_rng(0)
sales = pd.DataFrame({"store": np.repeat(np.arange(50), 100), "x": rng.normal(size=5000)})
sales["y"] = (1 + sales["store"] / 10) * sales["x"] + sales["store"] + rng.normal(scale=0.1, size=5000)
ddf = dd.from_pandas(sales, npartitions=4)''',
        "## Train\nThe function gets a `DataConnector` and a `PartitionContext`; what it returns is saved.",
        '''def train(data, ctx):
    df = data.to_pandas()
    if ctx.partition_id == 13:
        raise ValueError("store 13 is closed")   # one group fails; the others go on
    ctx.logger.info("store %s: %d rows", ctx.partition_id, len(df))
    return np.polyfit(df["x"], df["y"], 1)

run = ddf.manymodel.train(train, by="store", url=url, run_id="r1")
run.wait()   # a bar of groups, DONE or FAILED, out of all 50''',
        "## Watch\nWhile a run goes, the dashboard's *Progress* page shows a `manymodel-train` bar "
        "(one task per batch of groups), `run` displays its counts so far, and any other process "
        "can follow it from storage alone with `ManyModelRun.restore_from(run_id, url).get_progress()`.",
        '''run.progress()   # Dask's own bars over the run's tasks''',
        "## Inspect",
        "run",
        '''run.summary().head()''',
        '''failed = run.get_progress()["FAILED"][0]
print(failed.partition_id, failed.error)''',
        '''print(run.partition_details[7].logs)   # what the group printed or logged''',
        '''run.get_model(7)''',
        "## Predict with the trained models",
        '''def infer(data, model, ctx):
    df = data.to_pandas()
    return df.assign(pred=np.polyval(model, df["x"]))

scores = ddf.manymodel.predict(infer, by="store", url=url, training_run_id="r1", run_id="s1")
scores.wait()
scores.to_dask_dataframe().head()''',
        "## Later, from any process",
        '''from dask_manymodel import ManyModelRun
ManyModelRun.restore_from("r1", url).status''',
        '''client.close(); cluster.close()''',
    ],
    "02_pytorch_per_group.ipynb": [
        "# A PyTorch model per group\n`data.to_torch_dataset()` batches whole numpy columns; `TorchSerde` stores each module.",
        SETUP,
        '''rng = np.random.default_rng(0)
frame = pd.DataFrame({"sensor": np.repeat(["a", "b", "c"], 256), "x": rng.normal(size=768)})
frame["y"] = frame["x"] * frame["sensor"].map({"a": 1.0, "b": 2.0, "c": -1.0}) + 0.5
ddf = dd.from_pandas(frame, npartitions=2)''',
        '''def train(data, ctx):
    import torch
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    dataset = data.to_torch_dataset(batch_size=32, shuffle=True, seed=0)
    for epoch in range(30):
        for batch in dataset:  # or DataLoader(dataset, batch_size=None, num_workers=k)
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(batch["x"].reshape(-1, 1)).ravel(), batch["y"])
            loss.backward()
            optimizer.step()
    ctx.logger.info("final loss %.4f", loss.item())
    return model

from dask_manymodel import TorchSerde
run = ddf.manymodel.train(train, by="sensor", url=url, run_id="torch", serde=TorchSerde())
run.wait()''',
        '''model = run.get_model("b")
print(model.weight.item(), model.bias.item())   # close to 2.0 and 0.5''',
        '''print(run.partition_details["b"].logs)''',
        '''client.close(); cluster.close()''',
    ],
    "03_tensorflow_and_fileset.ipynb": [
        "# TensorFlow per group, and FileSet snapshots",
        SETUP,
        '''rng = np.random.default_rng(1)
frame = pd.DataFrame({"shop": np.repeat([1, 2], 200), "x": rng.normal(size=400).astype("float32")})
frame["y"] = (frame["x"] * frame["shop"] + 1).astype("float32")
ddf = dd.from_pandas(frame, npartitions=2)''',
        "## FileSet: an immutable, globally shuffled parquet snapshot",
        '''from dask_manymodel import FileSet
snapshot = ddf.manymodel.to_fileset(url, "training-data", shuffle=True)
print(snapshot, snapshot.files()[:2])
first = next(iter(FileSet(url, "training-data").to_tf_dataset(batch_size=64, shuffle=True)))
{name: tensor.shape for name, tensor in first.items()}''',
        "## A Keras model per shop",
        '''def train(data, ctx):
    import tensorflow as tf
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input(shape=(1,))
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(1)(inputs))
    model.compile(optimizer=tf.keras.optimizers.Adam(0.1), loss="mse")
    dataset = data.to_tf_dataset(batch_size=32, shuffle=True, seed=0).map(
        lambda b: (tf.reshape(b["x"], (-1, 1)), b["y"]))
    model.fit(dataset, epochs=30, verbose=0, shuffle=False)
    return model

from dask_manymodel import TensorFlowSerde
run = ddf.manymodel.train(train, by="shop", url=url, run_id="keras", serde=TensorFlowSerde())
run.wait()''',
        '''run.get_model(2).predict(np.array([[1.0]], dtype="float32"), verbose=0)  # close to 3''',
        '''snapshot.delete()
client.close(); cluster.close()''',
    ],
}


def build(folder: Path | None = None) -> None:
    """Write every notebook into ``folder`` (default: beside this script)."""
    folder = Path(__file__).parent if folder is None else Path(folder)
    for name, cells in NOTEBOOKS.items():
        notebook = nbformat.v4.new_notebook()
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        notebook.cells = [
            nbformat.v4.new_markdown_cell(text) if text.startswith("#") else nbformat.v4.new_code_cell(text)
            for text in cells
        ]
        for number, cell in enumerate(notebook.cells):
            cell.id = f"cell-{number}"  # stable ids: regenerating changes only what was edited
        nbformat.write(notebook, folder / name)


if __name__ == "__main__":
    build()
