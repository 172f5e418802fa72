"""A round-trip contract every serde passes, and framework models per group.

Each serde gets the same tests by subclassing :class:`SerdeContract`
(as fsspec's abstract filesystem tests do).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import dask_manymodel  # noqa: F401
from dask_manymodel import (
    DataConnector,
    InvalidArgumentError,
    ManyModelRun,
    ModelNotAvailableError,
    ModelSerde,
    PickleSerde,
    RunStatus,
)
from dask_manymodel.serde import TorchSerde, serde_from_manifest, serde_to_manifest, writes_in_memory

from .conftest import fit_line, make_frame


class SerdeContract:
    """Subclasses set ``make_serde`` and ``make_model``, and ``predict``."""

    def make_serde(self) -> ModelSerde:
        raise NotImplementedError

    def make_model(self):
        raise NotImplementedError

    def predict(self, model, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def test_round_trip_predicts_the_same(self, tmp_path):
        serde, model = self.make_serde(), self.make_model()
        path = str(tmp_path / serde.filename)
        serde.write(model, path)
        assert os.path.getsize(path) > 0
        x = np.linspace(-1, 1, 7, dtype="float32")
        np.testing.assert_allclose(self.predict(serde.read(path), x), self.predict(model, x), rtol=1e-6)

    def test_rebuilt_from_the_manifest(self):
        serde = self.make_serde()
        rebuilt = serde_from_manifest(serde_to_manifest(serde))
        assert type(rebuilt) is type(serde) and rebuilt.manifest_params() == serde.manifest_params()


class TestPickleSerde(SerdeContract):
    def make_serde(self):
        return PickleSerde()

    def make_model(self):
        return np.array([2.0, 1.0])

    def predict(self, model, x):
        return np.polyval(model, x)


class TestTorchSerde(SerdeContract):
    weights_only = False

    def make_serde(self):
        from dask_manymodel import TorchSerde

        pytest.importorskip("torch")
        if not self.weights_only:
            return TorchSerde()  # (a model_factory is for weights only)
        return TorchSerde(weights_only=True, model_factory=lambda: __import__("torch").nn.Linear(1, 1))

    def make_model(self):
        torch = pytest.importorskip("torch")
        torch.manual_seed(0)
        return torch.nn.Linear(1, 1)

    def predict(self, model, x):
        import torch

        with torch.no_grad():
            return model(torch.from_numpy(x).reshape(-1, 1)).numpy().ravel()


    def test_a_factory_without_weights_only_is_refused_naming_what_to_pass(self):
        """TorchSerde(model_factory=Net) saved and unpickled the whole module
        (code run from the file) and never called the factory."""
        from dask_manymodel import InvalidArgumentError, TorchSerde

        def make_net():
            return self.make_model()

        for weights_only in ({}, {"weights_only": False}):
            with pytest.raises(InvalidArgumentError) as info:
                TorchSerde(model_factory=make_net, **weights_only)
            assert str(info.value) == (
                "TorchSerde(model_factory=TestTorchSerde.test_a_factory_without_weights_only_is_refused_naming_what_"
                "to_pass.<locals>.make_net) needs weights_only=True: the factory builds the module that the saved "
                "state_dict is loaded into, and with weights_only=False the whole module is saved and unpickled "
                "instead, the factory never called; pass weights_only=True, or leave model_factory out"
            )
        assert TorchSerde(weights_only=True, model_factory=make_net).model_factory is make_net


class TestTorchSerdeWeightsOnly(TestTorchSerde):
    weights_only = True

    def test_without_a_factory_it_returns_the_state_dict(self, tmp_path):
        from dask_manymodel import TorchSerde

        path = str(tmp_path / "model.pt")
        TorchSerde(weights_only=True).write(self.make_model(), path)
        state = TorchSerde(weights_only=True).read(path)
        assert set(state) == {"weight", "bias"}


    def test_what_has_no_state_dict_is_refused_when_written(self, tmp_path):
        """torch.save would write it, and the safe loader would refuse the
        file for good: the group must fail when it is written instead."""
        from dask_manymodel import TorchSerde

        class Wrapper:  # e.g. a user's object that holds a module
            def __init__(self, module):
                self.module = module

        path = tmp_path / "model.pt"
        with pytest.raises(TypeError, match="Wrapper has no state_dict; return the torch module itself"):
            TorchSerde(weights_only=True).write(Wrapper(self.make_model()), str(path))
        assert not path.exists()


    def test_a_module_given_for_its_class_and_a_flag_that_is_no_bool_are_refused_at_once(self):
        """model_factory=Net() (for Net) is callable: get_model died after the
        run, in the module's forward(); weights_only="no" saved state_dicts."""
        from dask_manymodel import InvalidArgumentError, TorchSerde

        with pytest.raises(InvalidArgumentError) as info:
            TorchSerde(weights_only=True, model_factory=self.make_model())
        assert str(info.value) == (
            "TorchSerde model_factory must build an empty module when called with no arguments (a class such as "
            "Net, or a function), got Linear(in_features=1, out_features=1, bias=True); pass the class itself: "
            "model_factory=Linear"
        )
        with pytest.raises(InvalidArgumentError, match="^TorchSerde weights_only must be True or False, got 'no'$"):
            TorchSerde(weights_only="no")

    def test_a_module_class_is_taken_as_the_factory(self, tmp_path):
        """model_factory=Net, as the docs and the refusal of Net() say to
        pass it, was refused: a class has load_state_dict too (its function),
        and the error said to pass 'model_factory=type'."""
        from dask_manymodel import TorchSerde

        torch = pytest.importorskip("torch")

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = torch.nn.Linear(1, 1)

        serde = TorchSerde(weights_only=True, model_factory=Net)
        assert serde.model_factory is Net
        path = str(tmp_path / "model.pt")
        model = Net()
        serde.write(model, path)
        back = serde.read(path)
        assert isinstance(back, Net)
        assert all(a.equal(b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))

    def test_a_big_model_is_read_without_a_random_initialisation_first(self, tmp_path):
        """The factory's module was initialised at random (drawing from
        torch's generator), then load_state_dict overwrote every weight: for
        a 6 MB model half the time of a read, and the reader's random numbers
        moved on. The module is now built on the meta device, the weights
        assigned to it."""
        from dask_manymodel import TorchSerde

        torch = pytest.importorskip("torch")

        def factory():
            return torch.nn.Sequential(torch.nn.Linear(600, 600), torch.nn.ReLU(), torch.nn.Linear(600, 1))

        model = factory()  # 1.4 MB of weights
        serde = TorchSerde(weights_only=True, model_factory=factory)
        path = str(tmp_path / "model.pt")
        serde.write(model, path)
        torch.manual_seed(7)
        back = serde.read(path)
        drawn = torch.rand(3)
        torch.manual_seed(7)
        assert torch.equal(drawn, torch.rand(3))  # nothing drawn while reading
        assert isinstance(back, torch.nn.Sequential)
        for (name, tensor), (back_name, back_tensor) in zip(model.named_parameters(), back.named_parameters()):
            assert name == back_name and torch.equal(tensor, back_tensor)
            assert isinstance(back_tensor, torch.nn.Parameter) and back_tensor.requires_grad
            assert back_tensor.device.type == "cpu"
        x = torch.randn(4, 600)
        with torch.no_grad():
            assert torch.equal(model(x), back(x))

    @pytest.mark.parametrize(
        "shape", ["tied", "non-persistent buffer", "tensor attribute", "tensors in a list and a dict", "other dtype"]
    )
    def test_a_big_module_the_meta_device_cannot_build_alike_is_built_as_before(self, tmp_path, shape):
        """Where a module built on the meta device and assigned the weights
        would differ from one built and loaded (tied weights would each get
        their own, a tensor outside the state would stay on the meta device,
        weights of another dtype would not be converted): built as before."""
        from dask_manymodel import TorchSerde

        torch = pytest.importorskip("torch")

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = torch.nn.Embedding(1000, 300)  # 1.2 MB
                self.out = torch.nn.Linear(300, 1000, bias=False)
                if shape == "tied":
                    self.out.weight = self.embed.weight
                if shape == "non-persistent buffer":
                    self.register_buffer("scale", torch.full((1,), 2.0), persistent=False)
                if shape == "tensor attribute":
                    self.scale = torch.full((1,), 2.0)
                if shape == "tensors in a list and a dict":  # held outside the state_dict, not as attributes
                    self.constants = [torch.full((1,), 2.0), {"shift": torch.full((1,), 0.5)}]

            def forward(self, x):
                shift = self.constants[1]["shift"] if hasattr(self, "constants") else 0.0
                scale = self.constants[0] if hasattr(self, "constants") else getattr(self, "scale", 1.0)
                return self.out(self.embed(x)) * scale + shift

        model = Net().double() if shape == "other dtype" else Net()
        serde = TorchSerde(weights_only=True, model_factory=Net)
        path = str(tmp_path / "model.pt")
        serde.write(model, path)
        back = serde.read(path)
        assert not any(tensor.is_meta for tensor in (*back.parameters(), *back.buffers()))
        assert (back.out.weight is back.embed.weight) == (shape == "tied")
        assert back.out.weight.dtype == torch.float32  # the factory's, as load_state_dict converts
        x = torch.tensor([1, 5, 999])
        with torch.no_grad():
            torch.testing.assert_close(back(x), model.float()(x))

    def test_numpy_bools_are_taken_for_weights_only_as_plain_bools(self):
        """TorchSerde(weights_only=np.True_) (a comparison's answer) was
        refused as not True or False, where ExecutionOptions and the
        connectors take numpy's bools; kept as a numpy bool, _run.json would
        have said "True", a text."""
        for value in (np.True_, np.False_):
            serde = TorchSerde(weights_only=value)
            assert serde.weights_only is bool(value)
            entry = json.loads(json.dumps(serde_to_manifest(serde), default=str))
            assert serde_from_manifest(entry).weights_only is bool(value)


class TestTensorFlowSerde(SerdeContract):
    def make_serde(self):
        from dask_manymodel import TensorFlowSerde

        pytest.importorskip("tensorflow")
        return TensorFlowSerde()

    def make_model(self):
        tf = pytest.importorskip("tensorflow")
        inputs = tf.keras.Input(shape=(1,))
        return tf.keras.Model(inputs, tf.keras.layers.Dense(1)(inputs))

    def predict(self, model, x):
        return model.predict(x.reshape(-1, 1), verbose=0).ravel()


# ---------------------------------------------------------------------------
# a framework model per group, inside a real many-model run


def train_torch(data, ctx):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(30):  # epochs
        for batch in data.to_torch_dataset(batch_size=16, shuffle=True, seed=0):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(batch["x"].reshape(-1, 1)).ravel(), batch["y"])
            loss.backward()
            optimizer.step()
    return model


def test_a_torch_model_per_group(client, tmp_path):
    torch = pytest.importorskip("torch")
    from dask_manymodel import TorchSerde

    ddf = dd.from_pandas(make_frame(n_groups=3, rows=64), npartitions=2)
    run = ddf.manymodel.train(train_torch, by="store", url=str(tmp_path), run_id="t1", serde=TorchSerde())
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert os.path.isfile(tmp_path / "t1" / "store=2" / "model.pt")
    # a serde that writes its own file reports that file's size, like one that works in memory
    assert run.partition_details[2].bytes == os.path.getsize(tmp_path / "t1" / "store=2" / "model.pt") > 0
    restored = ManyModelRun.restore_from("t1", str(tmp_path))
    x = torch.tensor([[0.5], [-1.0]], dtype=torch.float64)
    with torch.no_grad():
        live, again = run.get_model(2)(x), restored.get_model(2)(x)
    assert torch.equal(live, again)
    np.testing.assert_allclose(live.numpy().ravel(), [1.2 * 0.5 + 2, 1.2 * -1 + 2], atol=0.05)


def train_keras(data, ctx):
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input(shape=(1,))
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(1)(inputs))
    model.compile(optimizer=tf.keras.optimizers.Adam(0.1), loss="mse")
    dataset = data.to_tf_dataset(batch_size=16, shuffle=True, seed=0).map(
        lambda b: (tf.reshape(b["x"], (-1, 1)), b["y"])
    )
    model.fit(dataset, epochs=40, verbose=0, shuffle=False)
    return model


def test_a_keras_model_per_group(client, tmp_path):
    pytest.importorskip("tensorflow")
    from dask_manymodel import TensorFlowSerde

    frame = make_frame(n_groups=2, rows=64).astype({"x": "float32", "y": "float32"})
    ddf = dd.from_pandas(frame, npartitions=1)
    run = ddf.manymodel.train(train_keras, by="store", url=str(tmp_path), run_id="k1", serde=TensorFlowSerde())
    assert run.wait(show_progress=False) == RunStatus.SUCCESS, run.summary()["error"].tolist()
    x = np.array([[0.5], [-1.0]], dtype="float32")
    live = run.get_model(1).predict(x, verbose=0).ravel()
    again = ManyModelRun.restore_from("k1", str(tmp_path)).get_model(1).predict(x, verbose=0).ravel()
    np.testing.assert_array_equal(live, again)
    np.testing.assert_allclose(live, [1.1 * 0.5 + 1, 1.1 * -1 + 1], atol=0.1)
    assert isinstance(pd.DataFrame(run.summary()), pd.DataFrame)


def test_only_a_serde_whose_to_bytes_matches_its_write_is_written_from_memory():
    class OwnWrite(PickleSerde):
        def write(self, model, file_path):  # a user's own format: to_bytes must not bypass it
            with open(file_path, "w") as f:
                f.write(repr(model))

    class OwnBoth(OwnWrite):
        def to_bytes(self, model):
            return repr(model).encode()

    assert writes_in_memory(PickleSerde())
    assert not writes_in_memory(OwnWrite())
    assert writes_in_memory(OwnBoth())
    assert not writes_in_memory(TorchSerde())


class FloatsSerde(ModelSerde):
    """Writes a float array's raw bytes; to_bytes gives a memoryview of them."""

    filename = "model.f8"

    def to_bytes(self, model):
        return memoryview(np.ascontiguousarray(model, dtype="float64"))

    def write(self, model, file_path):
        np.ascontiguousarray(model, dtype="float64").tofile(file_path)

    def read(self, file_path):
        return np.fromfile(file_path, dtype="float64")


def thousand_floats(data, ctx):
    return np.arange(1000, dtype="float64")


def test_a_model_given_as_a_memoryview_counts_its_bytes(client, tmp_path):
    """len() of a memoryview of floats counts its items: the run said 1,000
    bytes for a model file of 8,000."""
    ddf = dd.from_pandas(pd.DataFrame({"g": [0], "x": [1.0]}), npartitions=1)
    run = ddf.manymodel.train(thousand_floats, by="g", url=str(tmp_path), run_id="r", serde=FloatsSerde())
    run.wait()
    assert run.summary()["bytes"].tolist() == [8000]
    assert os.path.getsize(tmp_path / "r" / "g=0" / "model.f8") == 8000
    assert run.get_model(0).tolist() == list(range(1000))


def test_pickle_serde_takes_what_only_cloudpickle_can_and_reads_both(tmp_path):
    import pickle

    def make_local_model():
        class LocalModel:  # not importable by name: only cloudpickle can pickle it
            def __init__(self):
                self.weights = np.arange(3.0)

            def predict(self, x):
                return x @ self.weights

        return LocalModel()

    serde = PickleSerde()
    for model, check in [
        (np.arange(3.0), lambda m: m.tolist() == [0.0, 1.0, 2.0]),
        ({"scale": lambda x: 2 * x}, lambda m: m["scale"](4) == 8),
        (make_local_model(), lambda m: m.predict(np.ones(3)) == 3.0),
    ]:
        data = serde.to_bytes(model)
        path = tmp_path / "model.pkl"
        serde.write(model, str(path))
        assert path.read_bytes() == data
        assert check(serde.read(str(path))) and check(pickle.loads(data))


MAIN_CLASS_WRITER = """
import sys
from dask_manymodel import PickleSerde

class MeanModel:  # a class of the script itself: module __main__
    def __init__(self, mean):
        self.mean = mean

PickleSerde().write({"model": MeanModel(3.0)}, sys.argv[1])
"""


def test_pickle_serde_saves_a_scripts_own_class_by_value(tmp_path):
    """A class defined in a script or notebook pickles by reference to
    ``__main__`` in the process that made it (a local or threaded run):
    the file must still load in another process, e.g. ``restore_from``."""
    import subprocess
    import sys

    path = tmp_path / "model.pkl"
    subprocess.run([sys.executable, "-c", MAIN_CLASS_WRITER, str(path)], check=True, cwd=tmp_path)
    model = PickleSerde().read(str(path))  # this process's __main__ has no MeanModel
    assert type(model["model"]).__name__ == "MeanModel" and model["model"].mean == 3.0


def test_torch_serde_saves_a_module_class_only_cloudpickle_can():
    """A module class of the user's script reaches a worker process by value,
    where the standard pickler (saving classes by reference) refuses it;
    a class made inside a function is refused the same way."""
    torch = pytest.importorskip("torch")

    def make_net():
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = torch.nn.Linear(2, 1)

        return Net()

    net = make_net()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.pt")
        TorchSerde().write(net, path)
        back = TorchSerde().read(path)
    assert type(back).__name__ == "Net"
    assert torch.equal(back.linear.weight, net.linear.weight)


@pytest.mark.parametrize("filename", ["", "../model.pkl", "/tmp/model.pkl", "a/../../x.pkl", "m//x.pkl",
                                      "_partition.json", "_partition.json/x"])
def test_a_serde_filename_must_name_a_file_in_the_groups_folder(client, ddf, tmp_path, filename):
    # each of these gave SUCCESS with every group writing one shared file, or
    # over its own status, or an error per group after the work
    with pytest.raises(InvalidArgumentError, match="filename"):
        ddf.manymodel.train(fit_line, by="store", url=str(tmp_path), run_id="r1",
                            serde=PickleSerde(filename=filename))
    assert not os.path.exists(tmp_path / "r1")


class SmallInMemory(PickleSerde):
    """Keeps small models in memory, has write() save the others (to_bytes None)."""

    def to_bytes(self, model):
        return None if model["n"] > 40 else super().to_bytes(model)

    def write(self, model, file_path):
        with open(file_path, "wb") as f:
            f.write(PickleSerde.to_bytes(self, model))


class WritesNothing(PickleSerde):
    filename = "model.bin"

    def write(self, model, file_path):
        pass


class WritesAFolder(PickleSerde):
    def write(self, model, file_path):
        os.makedirs(file_path)
        with open(os.path.join(file_path, "a.pkl"), "wb") as f:
            f.write(b"x")


class ToBytesGivesText(PickleSerde):
    def to_bytes(self, model):
        return "not bytes"


class ReadOnlyName(PickleSerde):
    @property
    def filename(self):
        return "weights/model.bin"

    def __init__(self):
        pass


def rows_and_store(data, ctx):
    return {"n": len(data), "store": ctx.partition_id}


def test_serdes_that_save_some_models_through_write_or_in_a_subfolder(client, tmp_path):
    frame = pd.concat([make_frame(n_groups=2, rows=10), make_frame(n_groups=4, rows=60).query("store >= 2")])
    ddf = dd.from_pandas(frame, npartitions=2)
    for run_id, serde in [("some-bytes", SmallInMemory()), ("subfolder", ReadOnlyName())]:
        run = ddf.manymodel.train(rows_and_store, by="store", url=str(tmp_path), run_id=run_id, serde=serde)
        assert run.wait(show_progress=False) == RunStatus.SUCCESS, run.summary()["error"].tolist()
        # a restored handle rebuilds the serde (here one whose filename is a read-only property)
        restored = ManyModelRun.restore_from(run_id, str(tmp_path))
        assert [restored.get_model(g)["n"] for g in range(4)] == [10, 10, 60, 60]
    assert os.path.isfile(tmp_path / "subfolder" / "store=3" / "weights" / "model.bin")


@pytest.mark.parametrize("serde, says", [
    (WritesNothing(), "wrote no file"),
    (WritesAFolder(), "made a folder"),
    (ToBytesGivesText(), "ToBytesGivesText.to_bytes returned a str for group"),
])
def test_a_serde_that_writes_no_single_file_fails_its_groups(client, ddf, tmp_path, serde, says):
    run = ddf.manymodel.train(fit_line, by="store", url=str(tmp_path), run_id="r1", serde=serde)
    assert run.wait(show_progress=False) == RunStatus.FAILURE
    assert set(run.summary()["status"]) == {"FAILED"}
    assert all(says in d.error for d in run.partition_details.values())
    left = [name for _, folders, files in os.walk(tmp_path / "r1") for name in folders + files]
    assert set(left) - {"_run.json", "_groups.json", "_partition.json"} == {f"store={g}" for g in range(12)}


def test_get_model_with_another_serde_or_a_missing_file(client, ddf, tmp_path):
    run = ddf.manymodel.train(fit_line, by="store", url=str(tmp_path), run_id="r1",
                              serde=PickleSerde(filename="model.bin"))
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    with pytest.raises(InvalidArgumentError, match="stored its models as 'model.bin'"):
        ManyModelRun.restore_from("r1", str(tmp_path), serde=PickleSerde())
    os.remove(tmp_path / "r1" / "store=4" / "model.bin")
    with pytest.raises(ModelNotAvailableError, match="store=4/model.bin is missing"):
        run.get_model(4)


def test_a_filename_may_start_with_an_underscore():
    """Only the status file's own name is taken: runs stored with such a
    serde before the check came must still restore and predict."""
    from dask_manymodel.serde import check_filename

    for name in ("_model.pkl", "_weights/model.pt", "model_partition.json"):
        check_filename(PickleSerde(filename=name))


def test_a_run_json_that_names_no_serde_runs_nothing(client, ddf, tmp_path):
    """_run.json named its serde's class and arguments, and get_model (and a
    predict without serde=) called whatever it named: one edited in the store
    ran subprocess.run. Only a ModelSerde is built; serde= still loads."""
    url, marker = str(tmp_path), tmp_path / "ran"
    ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1").wait(show_progress=False)
    path = tmp_path / "r1" / "_run.json"
    manifest = json.loads(path.read_text())
    for entry in (
        {"class": "subprocess.run", "filename": "model.pkl",
         "params": {"args": [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]}},
        {"class": "builtins.print", "filename": "model.pkl", "params": {"sep": "ran"}},
        {"class": "print", "filename": "model.pkl"},  # no module at all: import_module("") raised ValueError
    ):
        path.write_text(json.dumps(manifest | {"serde": entry}))
        with pytest.raises(InvalidArgumentError, match="cannot be rebuilt here; pass serde= to restore_from"):
            ManyModelRun.restore_from("r1", url).get_model(1)
        with pytest.raises(InvalidArgumentError, match="cannot rebuild serde"):
            ddf.manymodel.predict(lambda data, model, ctx: None, by="store", url=url, training_run_id="r1",
                                  run_id="s1")
        assert not marker.exists()
    np.testing.assert_allclose(ManyModelRun.restore_from("r1", url, serde=PickleSerde()).get_model(1),
                               fit_line(DataConnector.from_pandas(make_frame().query("store == 1")), None))
