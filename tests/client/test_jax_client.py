"""A JAX client (examples/jax_client.py) in a torch federation, over real mTLS and Paillier.

Skipped when jax is not installed, unless FEDCORE_REQUIRE_JAX=1 (CI) makes that an error.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

try:
    import jax.numpy as jnp
except ImportError:
    if os.environ.get("FEDCORE_REQUIRE_JAX") == "1":
        raise
    pytest.skip(
        "jax is not installed (pip install -e '.[jax]'); FEDCORE_REQUIRE_JAX=1 makes this an error",
        allow_module_level=True,
    )
import torch

from fedcore.aggregator import Aggregator
from fedcore.client import Client
from fedcore.data import Dataset, client_shard
from fedcore.model import ModelLayout, flatten_state_dict, mlp
from protocol.tls import FederationPKI
from tests.client.conftest import member_config

# The runtime tests' session fixtures (a 1024-bit Paillier key, the digits data), under
# names that do not shadow this directory's own `pki`.
from tests.runtime.conftest import (
    Keys,
    accuracy_of,
    aggregator_config,
    make_client,
    run_federation,
)
from tests.runtime.conftest import digits as runtime_digits  # noqa: F401
from tests.runtime.conftest import keys as runtime_keys  # noqa: F401

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "jax_client.py"
HIDDEN = (128, 64)


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("examples_jax_client", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


jax_client = _load_example()


def test_the_jax_mlp_is_the_torch_mlp(runtime_digits: Dataset) -> None:  # noqa: F811
    torch.manual_seed(0)
    torch_model = mlp(64, hidden=HIDDEN)
    jax_model = jax_client.JaxMLP(runtime_digits.x_train, runtime_digits.y_train, hidden=HIDDEN)
    assert jax_model.layout == ModelLayout.of(torch_model.state_dict())
    weights = jax_model.layout.split(flatten_state_dict(torch_model.state_dict()))
    x = runtime_digits.x_test
    expected = torch_model(torch.from_numpy(x)).detach().numpy()
    got = np.asarray(jax_client.log_probs([jnp.asarray(w) for w in weights], jnp.asarray(x)))
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.slow
async def test_a_jax_client_trains_with_torch_clients(
    tmp_path: Path,
    pki: FederationPKI,
    runtime_keys: Keys,  # noqa: F811
    runtime_digits: Dataset,  # noqa: F811
) -> None:
    rounds = 3
    config = aggregator_config(
        tmp_path,
        pki.out_dir,
        runtime_keys,
        model_kwargs={"in_features": 64, "hidden": list(HIDDEN)},
        rounds=rounds,
        local_epochs=4,
        learning_rate=0.1,
        min_clients=3,
        clients_per_round=3,
    )
    aggregator = Aggregator(config)
    initial = aggregator.checkpoint.global_weights.copy()
    federation = aggregator.federation
    torch_clients = [
        make_client(
            i, pki.out_dir, runtime_keys, runtime_digits, 3, federation=federation, hidden=HIDDEN
        )
        for i in (0, 1)
    ]
    x, y = client_shard(runtime_digits, 2, 3, seed=0)
    jax_model = jax_client.JaxMLP(
        x, y, x_test=runtime_digits.x_test, y_test=runtime_digits.y_test, hidden=HIDDEN, seed=2
    )
    jax_member = Client(
        jax_model,
        None,
        None,
        member_config(pki, 2, federation, runtime_keys.private),
    )

    checkpoint, results = await run_federation(aggregator, [*torch_clients, jax_member])

    assert checkpoint.rounds_completed == rounds
    for result in results:
        assert not isinstance(result, BaseException), result
        assert result.rounds_contributed == rounds
    for record in checkpoint.history:
        assert sorted(record["contributors"]) == ["client-0", "client-1", "client-2"]
    before = accuracy_of(initial, runtime_digits, hidden=HIDDEN)
    after = accuracy_of(checkpoint.global_weights, runtime_digits, hidden=HIDDEN)
    print(f"digits accuracy: initial {before:.3f}, after {rounds} rounds {after:.3f}")
    assert after >= 0.85 and after >= before + 0.5, (before, after)
    # the JAX client reads the global model as torch does
    jax_view = jax_model.evaluate(jax_model.layout.split(checkpoint.global_weights))
    assert jax_view is not None and abs(jax_view["accuracy"] - after) < 1e-6
