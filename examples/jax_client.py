"""A fedcore client written in JAX: the digits MLP in plain jax.numpy, trained with jax.grad.

It joins the same federation as torch clients. The aggregator runs the torch seed MLP
for scikit-learn's digits::

    fedcore aggregator --model fedcore.model:mlp --model-arg in_features=64 ...

and this client federates the same arrays: the torch model's ``state_dict`` names in
the same order (``layers.0.weight``, ``layers.0.bias``, ``layers.2.weight``, ...: the
``nn.Sequential`` numbers its ReLUs too), each weight matrix ``[out, in]`` as
``torch.nn.Linear`` stores it, so a layer computes ``x @ w.T + b``. Run it as::

    pip install "fedcore[jax]"
    python examples/jax_client.py --server agg.example.org:8765 --cert client-2.pem \\
        --key client-2.key --ca ca.pem --federation federation.json --shard 2 --of 3

The model code below imports no torch; see docs/embedding.md for the API it implements.
"""

from __future__ import annotations

import argparse
import itertools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedcore.client import ArrayModel, ClientConfig

__all__ = ["JaxMLP", "layer_names", "log_probs", "main"]


def layer_names(num_layers: int) -> list[str]:
    """The torch seed MLP's state_dict keys: its Sequential interleaves Linear and ReLU."""
    names = []
    for layer in range(num_layers):
        names += [f"layers.{2 * layer}.weight", f"layers.{2 * layer}.bias"]
    return names


def init_params(sizes: Sequence[int], seed: int) -> list[jax.Array]:
    """torch.nn.Linear's default initialization: weights and biases uniform in ±1/sqrt(fan_in)."""
    key = jax.random.PRNGKey(seed)
    params = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        key, weight_key, bias_key = jax.random.split(key, 3)
        bound = 1.0 / np.sqrt(fan_in)
        params.append(
            jax.random.uniform(weight_key, (fan_out, fan_in), minval=-bound, maxval=bound)
        )
        params.append(jax.random.uniform(bias_key, (fan_out,), minval=-bound, maxval=bound))
    return params


def log_probs(params: Sequence[jax.Array], x: jax.Array) -> jax.Array:
    """Log-probabilities of the classes: ReLU hidden layers, log-softmax output."""
    hidden = x
    for i in range(0, len(params) - 2, 2):
        hidden = jax.nn.relu(hidden @ params[i].T + params[i + 1])
    return jax.nn.log_softmax(hidden @ params[-2].T + params[-1])


def _nll(params: list[jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    return -jnp.mean(jnp.take_along_axis(log_probs(params, x), y[:, None], axis=1))


@jax.jit
def _sgd_step(
    params: list[jax.Array],
    velocity: list[jax.Array],
    x: jax.Array,
    y: jax.Array,
    lr: float,
    momentum: float,
) -> tuple[list[jax.Array], list[jax.Array]]:
    # torch.optim.SGD's momentum, so JAX and torch clients take the same kind of step
    grads = jax.grad(_nll)(params, x, y)
    velocity = [momentum * v + g for v, g in zip(velocity, grads, strict=True)]
    return [p - lr * v for p, v in zip(params, velocity, strict=True)], velocity


class JaxMLP(ArrayModel):
    """The digits MLP as a fedcore `ArrayModel`: SGD with momentum on local ``(x, y)``.

    ``x_test``/``y_test`` (optional) is held-out data the global model is evaluated on
    each round; its accuracy and loss travel, encrypted, with the update.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        x_test: np.ndarray | None = None,
        y_test: np.ndarray | None = None,
        hidden: Sequence[int] = (512, 256),
        classes: int = 10,
        batch_size: int = 64,
        momentum: float = 0.9,
        seed: int = 0,
    ) -> None:
        self.x = jnp.asarray(x, dtype=jnp.float32)
        self.y = jnp.asarray(y, dtype=jnp.int32)
        self.x_test = None if x_test is None else jnp.asarray(x_test, dtype=jnp.float32)
        self.y_test = None if y_test is None else jnp.asarray(y_test, dtype=jnp.int32)
        self.sizes = (int(self.x.shape[1]), *hidden, classes)
        self.batch_size = batch_size
        self.momentum = momentum
        self.seed = seed

    @property
    def names(self) -> list[str]:
        """``layers.0.weight``, ``layers.0.bias``, ``layers.2.weight``, ... (torch's keys)."""
        return layer_names(len(self.sizes) - 1)

    def get_weights(self) -> list[jax.Array]:
        """A fresh initialization (only its shapes matter: rounds start from global weights)."""
        return init_params(self.sizes, self.seed)

    def train(
        self, weights: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int]:
        """``epochs`` of minibatch SGD at ``lr``, shuffled by this client's and the round's seed."""
        epochs = int(config.get("epochs", 1))
        lr = float(config.get("lr", 0.05))
        rng = np.random.default_rng([self.seed, int(config.get("seed", 0))])
        params = [jnp.asarray(w) for w in weights]
        velocity = [jnp.zeros_like(p) for p in params]
        samples = int(self.x.shape[0])
        for _ in range(epochs):
            order = rng.permutation(samples)
            for start in range(0, samples, self.batch_size):
                batch = order[start : start + self.batch_size]
                params, velocity = _sgd_step(
                    params, velocity, self.x[batch], self.y[batch], lr, self.momentum
                )
        return [np.asarray(p) for p in params], samples

    def evaluate(self, weights: list[np.ndarray]) -> dict[str, float] | None:
        """Accuracy and mean NLL loss of the global weights on the held-out data, if any."""
        if self.x_test is None or self.y_test is None:
            return None
        params = [jnp.asarray(w) for w in weights]
        predicted = log_probs(params, self.x_test)
        accuracy = jnp.mean(jnp.argmax(predicted, axis=1) == self.y_test)
        return {"accuracy": float(accuracy), "loss": float(_nll(params, self.x_test, self.y_test))}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the JAX client on shard ``--shard`` of ``--of`` of the digits training set."""
    from fedcore.client import Client
    from fedcore.data import client_shard, load_digits

    parser = argparse.ArgumentParser(description="A fedcore client that trains in JAX.")
    parser.add_argument("--server", required=True, help="the aggregator's HOST:PORT")
    parser.add_argument("--cert", type=Path, required=True, help="this client's certificate")
    parser.add_argument("--key", type=Path, required=True, help="this client's TLS key")
    parser.add_argument("--ca", type=Path, required=True, help="the federation's CA certificate")
    parser.add_argument("--federation", type=Path, required=True, help="the federation file")
    parser.add_argument("--private-key", type=Path, help="the Paillier key, on committee clients")
    parser.add_argument("--server-hostname", help="the name in the aggregator's certificate")
    parser.add_argument("--shard", type=int, default=0, help="this client's shard of the data")
    parser.add_argument("--of", type=int, default=1, help="how many shards the data is cut into")
    parser.add_argument(
        "--hidden", type=int, nargs="*", default=[512, 256], help="hidden layer sizes"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    digits = load_digits()
    x, y = client_shard(digits, args.shard, args.of, seed=0)
    model = JaxMLP(
        x, y, x_test=digits.x_test, y_test=digits.y_test, hidden=args.hidden, seed=args.shard
    )
    config = ClientConfig(
        cert=args.cert,
        key=args.key,
        ca=args.ca,
        federation=args.federation,
        private_key=args.private_key,
        server_hostname=args.server_hostname,
    )
    result = Client(model, None, None, config).run_forever(args.server)
    print(f"contributed to {result.rounds_contributed} rounds; last metrics {result.last_metrics}")
    return 0


if __name__ == "__main__":  # the encryption pool spawns a worker process
    raise SystemExit(main())
