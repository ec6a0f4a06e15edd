"""The numpy-level client API: `ArrayModel`, its layout, and the checks on what it returns."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedcore.aggregator import Aggregator
from fedcore.client import ArrayModel, Client, TorchModel, UpdatePipeline
from fedcore.errors import ConfigError
from fedcore.layout import FEDERATED_DTYPE, ModelLayout, TensorSpec
from fedcore.model import flatten_state_dict, mlp, module_from_arrays
from protocol.tls import FederationPKI
from tests.client.conftest import member_config

# The runtime tests' session fixture (a 1024-bit Paillier key), named apart from ours.
from tests.runtime.conftest import Keys, aggregator_config, make_client
from tests.runtime.conftest import digits as runtime_digits  # noqa: F401
from tests.runtime.conftest import keys as runtime_keys  # noqa: F401

ROUND = {"epochs": 1, "lr": 0.1, "seed": 7}
REPORTED = ("accuracy", "loss")


class Dense(ArrayModel):
    """One dense layer whose `train` returns whatever the test hands it."""

    names = ("dense.kernel", "dense.bias")

    def __init__(self, trained: Any = None, metrics: Any = None) -> None:
        self.trained = trained
        self.metrics = metrics
        self.seen: list[list[np.ndarray]] = []

    def get_weights(self) -> list[np.ndarray]:
        return [np.zeros((2, 3), dtype=np.float64), np.zeros(2, dtype=np.float32)]

    def train(self, weights: list[np.ndarray], config: dict[str, Any]) -> Any:
        self.seen.append(weights)
        if self.trained is not None:
            return self.trained
        for array in weights:  # in place: the arrays handed over are the model's to change
            array += 1.0
        return weights, 150

    def evaluate(self, weights: list[np.ndarray]) -> Any:
        return self.metrics


GLOBAL = np.arange(8, dtype=np.float32) / 8


def _train(model: ArrayModel, global_weights: np.ndarray = GLOBAL) -> Any:
    return UpdatePipeline(model).train(global_weights.tobytes(), dict(ROUND), REPORTED)


# ------------------------------------------------------------------ the layout


def test_the_layout_is_the_names_and_shapes_of_the_arrays() -> None:
    layout = Dense().layout
    assert layout == ModelLayout(
        tensors=(
            TensorSpec(name="dense.kernel", shape=(2, 3), dtype=FEDERATED_DTYPE),
            TensorSpec(name="dense.bias", shape=(2,), dtype=FEDERATED_DTYPE),
        )
    )
    assert layout.numel == 8
    assert ModelLayout.from_json(layout.to_json()) == layout


def test_arrays_laid_out_like_a_torch_model_match_its_layout() -> None:
    torch_model = mlp(64, hidden=(16,))
    state = torch_model.state_dict()
    arrays = [t.numpy().astype(np.float64) for t in state.values()]
    assert ModelLayout.of_arrays(list(state), arrays) == ModelLayout.of(state)
    # an aggregator without torch training code builds its model from the same arrays
    module = module_from_arrays(dict(zip(state, arrays, strict=True)))
    assert ModelLayout.of(module.state_dict()) == ModelLayout.of(state)
    np.testing.assert_array_equal(
        flatten_state_dict(module.state_dict()), flatten_state_dict(state)
    )


def test_a_transposed_array_is_a_different_layout_and_says_which() -> None:
    state = mlp(64, hidden=(16,)).state_dict()
    arrays = [t.numpy() for t in state.values()]
    arrays[0] = arrays[0].T
    theirs = ModelLayout.of_arrays(list(state), arrays)
    assert theirs != ModelLayout.of(state)
    assert ModelLayout.of(state).difference(theirs) == (
        "tensor 0 is layers.0.weight [64, 16] torch.float32, not layers.0.weight [16, 64] "
        "torch.float32"
    )
    assert ModelLayout.of(state).difference(ModelLayout.of(state)) == ""


@pytest.mark.parametrize(
    ("names", "arrays", "error", "message"),
    [
        (["a", "a"], [np.zeros(1), np.zeros(2)], ValueError, "'a' appears twice"),
        (["a"], [np.zeros(1), np.zeros(2)], ValueError, "one name per array"),
        ("ab", [np.zeros(1), np.zeros(2)], ValueError, "one name per array"),
        (["a", ""], [np.zeros(1), np.zeros(2)], ValueError, "non-empty strings"),
        (["a"], [np.array(["x"])], TypeError, "'a' has dtype <U1"),
        (["a"], [np.zeros(2, dtype=complex)], TypeError, "only real-valued"),
    ],
)
def test_bad_names_or_arrays_make_no_layout(
    names: Sequence[str], arrays: list[np.ndarray], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        ModelLayout.of_arrays(names, arrays)


def test_a_model_with_a_bad_layout_is_a_config_error() -> None:
    class Unnamed(Dense):
        names = ("only-one",)

    with pytest.raises(ConfigError, match=r"^Unnamed: names must be a sequence of one name"):
        UpdatePipeline(Unnamed())


def test_module_from_arrays_refuses_an_order_torch_cannot_keep() -> None:
    arrays = {"layers.0.weight": np.ones((2, 2)), "head": np.ones(2), "layers.0.bias": np.ones(2)}
    with pytest.raises(ValueError, match="torch would order these arrays"):
        module_from_arrays(arrays)


# ------------------------------------------------------------------ a round


def test_the_update_is_the_trained_arrays_minus_the_global_ones() -> None:
    model = Dense(metrics={"loss": 0.25, "accuracy": np.float32(0.5), "extra": 3})
    trained = _train(model)
    np.testing.assert_array_equal(trained.update, np.ones(8, dtype=np.float32))
    assert trained.update.dtype == np.float32
    assert trained.samples == 150
    assert trained.report == (0.5, 0.25)  # the federation's metrics, in its order
    assert set(trained.timings) == {"evaluate_s", "train_s"}
    # train got writable copies of the global weights in the layout's shapes
    kernel, bias = model.seen[0]
    assert kernel.shape == (2, 3) and bias.shape == (2,)
    assert kernel.dtype == np.float32


def test_a_model_that_evaluates_nothing_reports_nothing() -> None:
    trained = _train(Dense(metrics=None))
    assert trained.report is None
    assert "evaluate_s" not in trained.timings


def test_jax_style_arrays_and_numpy_scalars_are_accepted() -> None:
    class Memoryview:
        """An array type of another framework: numpy reads it through __array__."""

        def __init__(self, values: np.ndarray) -> None:
            self.values = values

        def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
            return self.values

    trained_arrays = (Memoryview(np.full((2, 3), 2.0)), np.full(2, 2.0, dtype=np.float16))
    trained = _train(Dense(trained=(trained_arrays, np.int64(10))))
    np.testing.assert_allclose(trained.update, 2.0 - GLOBAL)
    assert trained.samples == 10


def test_a_wrong_shape_is_refused_naming_the_tensor_and_both_shapes() -> None:
    model = Dense(trained=([np.zeros((3, 2)), np.zeros(2)], 10))
    with pytest.raises(ConfigError) as refused:
        _train(model)
    assert str(refused.value) == (
        "Dense.train returned dense.kernel with shape (3, 2); the layout needs (2, 3)"
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_result_is_refused(bad: float) -> None:
    bias = np.array([0.0, bad])
    with pytest.raises(
        ConfigError,
        match=r"^Dense\.train returned non-finite values in dense\.bias: 1 of 2, the first at flat "
        r"index 1 is (nan|inf|-inf) as float32$",
    ):
        _train(Dense(trained=([np.zeros((2, 3)), bias], 10)))


def test_a_value_beyond_float32_is_refused_as_non_finite() -> None:
    kernel = np.full((2, 3), 1e39)  # finite in float64, inf once federated as float32
    with pytest.raises(
        ConfigError,
        match=r"non-finite values in dense\.kernel: 6 of 6, the first at flat index 0 is inf",
    ):
        _train(Dense(trained=([kernel, np.zeros(2)], 10)))


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (42, r"^Dense.train must return \(weights, samples\).*; got int$"),
        ({"dense.kernel": 0}, r"^Dense.train must return \(weights, samples\).*; got dict$"),
        ([np.zeros((2, 3)), np.zeros(2)], r"must return a sequence of 2 arrays .*got ndarray$"),
        (([np.zeros((2, 3))], 10), r"^Dense.train returned 1 arrays; the layout has 2 \("),
        ((np.zeros(8), 10), r"must return a sequence of 2 arrays .*got ndarray$"),
        (([np.zeros((2, 3)), "ab"], 10), r"returned dense.bias as str of dtype <U2; it must be"),
        (([np.zeros((2, 3)), np.zeros(2)], -1), r"number of samples it used, got -1$"),
        (([np.zeros((2, 3)), np.zeros(2)], True), r"number of samples it used, got True$"),
        (([np.zeros((2, 3)), np.zeros(2)], 1.5), r"number of samples it used, got 1.5$"),
    ],
)
def test_a_result_of_the_wrong_type_is_a_config_error(returned: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _train(Dense(trained=returned))


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ([0.5], r"^Dense.evaluate must return a mapping of metric name to number, got list$"),
        ({"accuracy": "high"}, r"^Dense.evaluate returned metric 'accuracy' = 'high'"),
    ],
)
def test_bad_metrics_are_a_config_error(metrics: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _train(Dense(metrics=metrics))


def test_global_weights_of_another_size_are_refused() -> None:
    with pytest.raises(ConfigError, match="RoundStart carries 9 weights; model has 8"):
        _train(Dense(), np.zeros(9, dtype=np.float32))


# ------------------------------------------------------------------ the torch adapter


def test_a_torch_model_goes_through_the_same_pipeline() -> None:
    torch.manual_seed(0)
    model = mlp(4, hidden=(3,), classes=2)
    initial = flatten_state_dict(model.state_dict())

    def train_fn(module: torch.nn.Module, round_config: dict[str, Any]) -> int:
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.add_(round_config["lr"])
        return 20

    pipeline = UpdatePipeline(model, train_fn, lambda module: {"accuracy": 1.0, "loss": 2.0})
    assert isinstance(pipeline.model, TorchModel)
    assert pipeline.layout == ModelLayout.of(model.state_dict())
    global_weights = np.linspace(-1, 1, initial.size, dtype=np.float32)
    trained = pipeline.train(global_weights.tobytes(), dict(ROUND), REPORTED)
    np.testing.assert_allclose(trained.update, np.full(initial.size, 0.1), rtol=1e-5)
    assert (trained.samples, trained.report) == (20, (1.0, 2.0))


@pytest.mark.parametrize(
    ("model", "train_fn", "evaluate_fn", "message"),
    [
        (Dense(), lambda m, c: 1, None, "Dense is an ArrayModel: it trains and evaluates itself"),
        (Dense(), None, lambda m: {}, "Dense is an ArrayModel"),
        (mlp(4, hidden=(3,)), None, None, "a torch model needs train_fn"),
        ({"w": np.zeros(2)}, lambda m, c: 1, None, "model must be a torch.nn.Module .* got dict"),
    ],
)
def test_a_model_and_callbacks_that_do_not_fit_are_refused(
    model: Any, train_fn: Any, evaluate_fn: Any, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        UpdatePipeline(model, train_fn, evaluate_fn)


def test_a_torch_train_fn_returning_no_count_is_a_config_error() -> None:
    pipeline = UpdatePipeline(mlp(4, hidden=(3,)), lambda module, config: None)
    weights = np.zeros(pipeline.layout.numel, dtype=np.float32)
    with pytest.raises(ConfigError, match=r"^train_fn must return the number of samples"):
        pipeline.train(weights.tobytes(), dict(ROUND), REPORTED)


# ------------------------------------------------------------------ without torch


def test_a_numpy_level_client_trains_and_seals_without_importing_torch() -> None:
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        from fedcore.client import ArrayModel, UpdatePipeline, seal
        from fedcore.codec import codec_for
        from fedcore.contracts import FederationParams, SessionInfo
        from fedcore.crypto import generate_keypair
        from fedcore.crypto.masking import public_key_bytes

        class Halve(ArrayModel):
            names = ("w", "b")
            def get_weights(self):
                return [np.zeros((3, 2)), np.zeros(3)]
            def train(self, weights, config):
                return [w / 2 for w in weights], 100

        pipeline = UpdatePipeline(Halve())
        weights = np.arange(9, dtype=np.float32)
        trained = pipeline.train(weights.tobytes(), {"epochs": 1}, ("accuracy",))
        assert np.array_equal(trained.update, -weights / 2), trained.update
        public, _ = generate_keypair(512)
        federation = FederationParams(mode="shared", public_key=public)
        session = SessionInfo(
            num_values=9, chunk_items=2, model_layout=pipeline.layout.to_json(), rounds=1
        )
        unmasker = public_key_bytes(X25519PrivateKey.generate())
        prepared = seal(trained, codec_for(federation, session), federation, (unmasker,), None)
        assert prepared.payloads and prepared.weight == 1
        print(sorted(name for name in sys.modules if name.split(".")[0] == "torch"))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ------------------------------------------------------------------ in a federation


@pytest.mark.slow
async def test_a_broken_array_model_stops_its_client_instead_of_reconnecting(
    tmp_path: Path,
    pki: FederationPKI,
    runtime_keys: Keys,  # noqa: F811
    runtime_digits: Any,  # noqa: F811
) -> None:
    config = aggregator_config(
        tmp_path,
        pki.out_dir,
        runtime_keys,
        model_kwargs={"in_features": 64, "hidden": [8]},
        min_clients=2,
        clients_per_round=2,
        rounds=1,
    )
    aggregator = Aggregator(config)
    served = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(aggregator.wait_started(), 30)
    server = f"127.0.0.1:{aggregator.port}"
    federation = aggregator.federation
    good = make_client(
        0, pki.out_dir, runtime_keys, runtime_digits, 2, federation=federation, hidden=(8,)
    )

    class Broken(ArrayModel):
        names = aggregator.layout.names

        def get_weights(self) -> list[np.ndarray]:
            return [np.zeros(spec.shape) for spec in aggregator.layout.tensors]

        def train(self, weights: list[np.ndarray], config: dict[str, Any]) -> Any:
            return weights  # forgot the sample count

    broken = Client(
        Broken(),
        None,
        None,
        member_config(pki, 1, federation, runtime_keys.private),
    )
    good_run = asyncio.create_task(good.run(server))
    try:
        with pytest.raises(ConfigError, match=r"^Broken.train must return \(weights, samples\)"):
            await asyncio.wait_for(broken.run(server), 60)
        assert broken.result.reconnects == 0
        assert broken.result.rounds_contributed == 0
    finally:
        aggregator.request_stop()
        good_run.cancel()
        await asyncio.wait_for(served, 30)
