"""The aggregator's dashboard in a real headless Chromium, beside a real federation.

Real mutual TLS on 127.0.0.1 (the PKI of `fedcore certs`), a real 1024-bit Paillier key,
real torch clients that evaluate the global model: the page must show the rounds
advancing and, for each round, the accuracy the aggregator decrypted with the sum.

Needs selenium, chromium and chromedriver; skipped without them unless
FEDCORE_REQUIRE_BROWSER=1 (CI), where their absence fails the test.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcore.aggregator import Aggregator, RoundReport
from fedcore.client import Client
from fedcore.contracts import FederationParams
from fedcore.dashboard import Dashboard
from fedcore.data import Dataset
from fedcore.metrics import AggregatorMetrics, MetricsServer
from fedcore.training import make_evaluate_fn
from tests.runtime.conftest import (
    Keys,
    accuracy_of,
    aggregator_config,
    make_client,
    run_federation,
)

ROUNDS = 3
CLIENTS = 3
SCREENSHOT = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard.png"
PAGE_TIMEOUT = 120.0  # seconds the page may take to show a round (a busy 2-core machine)


@dataclass(frozen=True)
class Browser:
    chromium: str
    chromedriver: str


def _browser_or_skip() -> Browser:
    """Chromium, its driver and selenium, or a skip (a failure under FEDCORE_REQUIRE_BROWSER=1)."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install selenium)")
    chromium = next(
        (p for name in ("chromium", "chromium-browser") if (p := shutil.which(name))), None
    )
    chromedriver = shutil.which("chromedriver")
    if chromium is None:
        missing.append("chromium (apt-get install chromium)")
    if chromedriver is None:
        missing.append("chromedriver (apt-get install chromium-driver)")
    if missing:
        reason = f"the dashboard browser test needs {', '.join(missing)}"
        if os.environ.get("FEDCORE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason}; FEDCORE_REQUIRE_BROWSER=1 forbids skipping")
        pytest.skip(reason)
    assert chromium is not None and chromedriver is not None
    return Browser(chromium=chromium, chromedriver=chromedriver)


def _start_chromium(browser: Browser, profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser.chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1700",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations, errors
    # An explicit driver path: Selenium Manager must not try to download one.
    return webdriver.Chrome(service=Service(executable_path=browser.chromedriver), options=options)


def _wait_for(what: str, probe: Callable[[], Any], deadline: float) -> Any:
    """Call ``probe`` until it returns something truthy; fail with ``what`` at the deadline."""
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"the dashboard did not show {what} in time")
        time.sleep(0.2)


@dataclass
class PageReading:
    round_shown: int
    accuracy_text: str
    accuracy_value: float
    headline_text: str
    connected_clients: str
    errors: str


def _read_round(driver: Any, round_id: int, deadline: float) -> PageReading:
    """Wait until the rounds table has ``round_id``'s row; read it and the header cards."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def probe() -> PageReading | None:
        try:
            row = driver.find_element(By.CSS_SELECTOR, f'#rounds-body tr[data-round="{round_id}"]')
            cell = row.find_element(By.CSS_SELECTOR, "td.accuracy")
            return PageReading(
                round_shown=int(driver.find_element(By.ID, "round-id").text),
                accuracy_text=cell.text,
                accuracy_value=float(cell.get_attribute("data-value") or "nan"),
                headline_text=driver.find_element(By.ID, "global-accuracy").text,
                connected_clients=driver.find_element(By.ID, "connected-clients").text,
                errors=driver.find_element(By.ID, "error").text,
            )
        except (NoSuchElementException, StaleElementReferenceException, ValueError):
            return None  # not rendered yet, or re-rendered while we read: poll again

    return _wait_for(f"round {round_id}", probe, deadline)  # type: ignore[no-any-return]


HOSTILE = '<img src=x onerror="window.pwned=1"><b>bold</b>'


def test_the_page_shows_untrusted_strings_as_text(tmp_path: Path) -> None:
    """Label values, phase and metric names reach the page as text, never as markup."""
    browser = _browser_or_skip()
    from selenium.webdriver.common.by import By

    metrics = AggregatorMetrics()
    metrics.updates_rejected_total.labels(reason=HOSTILE).inc()
    dashboard = Dashboard(metrics, rounds_planned=3, min_clients=1, encrypted=True)
    dashboard.round_completed(
        RoundReport(
            round_id=1,
            rounds_completed=1,
            contributors=("client-0",),
            total_weight=1,
            phase_seconds={HOSTILE: 1.0},
            client_metrics={"accuracy": 0.5, "loss": 1.0, HOSTILE: 0.1},
            client_timings={},
            check_seconds={},
            bytes_received=1,
            fold_seconds=0.0,
        )
    )

    def status() -> dict[str, Any]:
        live = dashboard.status(rounds_completed=1, round_id=2, round_phase=HOSTILE, stopping=False)
        return live.to_json()

    with MetricsServer(metrics, status=status) as server:
        driver = _start_chromium(browser, tmp_path / "chromium-profile")
        try:
            driver.get(f"http://127.0.0.1:{server.port}/")
            deadline = time.monotonic() + 60
            _wait_for(
                "the round phase",
                lambda: driver.find_element(By.ID, "round-phase").text == HOSTILE,
                deadline,
            )
            assert HOSTILE in driver.find_element(By.ID, "rejected-body").text
            assert f"{HOSTILE} s" in driver.find_element(By.ID, "rounds-head").text
            assert driver.find_elements(By.CSS_SELECTOR, "img, b") == []
            assert driver.execute_script("return window.pwned === undefined") is True
        finally:
            driver.quit()


def _evaluating_client(
    index: int, pki: Path, keys: Keys, data: Dataset, *, federation: FederationParams
) -> Client:
    """The runtime tests' client ``index`` (`make_client`: its model, data, settings) that
    also evaluates each global model it is sent, on the digits test set."""
    train_fns: list[Callable[..., int]] = []

    def keep(train_fn: Callable[..., int]) -> Callable[..., int]:
        train_fns.append(train_fn)
        return train_fn

    base = make_client(index, pki, keys, data, CLIENTS, federation=federation, train_wrapper=keep)
    evaluate_fn = make_evaluate_fn(data.x_test, data.y_test)
    return Client(base.model, train_fns[0], evaluate_fn, base.config)


@pytest.mark.slow
async def test_dashboard_shows_rounds_advancing_and_the_decrypted_accuracy(
    tmp_path: Path, pki: Path, keys: Keys, digits: Dataset
) -> None:
    browser = _browser_or_skip()
    reports: dict[int, RoundReport] = {}
    gauges: dict[int, float | None] = {}
    checked_by_page: set[int] = set()  # rounds the page has been read for (browser thread)
    page_failed = threading.Event()
    weights_after: dict[int, np.ndarray] = {}

    async def hold_until_read(report: RoundReport, weights: np.ndarray) -> None:
        # The next round starts only once the page showed this one: rounds cannot
        # outrun the browser, so every read is of a known round.
        reports[report.round_id] = report
        weights_after[report.round_id] = weights.copy()
        gauges[report.round_id] = aggregator.metrics.registry.get_sample_value(
            "fedcore_global_model_accuracy"
        )
        deadline = time.monotonic() + PAGE_TIMEOUT
        while report.round_id not in checked_by_page and not page_failed.is_set():
            if time.monotonic() >= deadline:
                return  # the browser side fails with the reason
            await asyncio.sleep(0.1)

    config = aggregator_config(
        tmp_path,
        pki,
        keys,
        rounds=ROUNDS,
        local_epochs=1,
        min_clients=CLIENTS,
        clients_per_round=CLIENTS,
        metrics_port=0,
    )
    aggregator = Aggregator(config, on_round_complete=hold_until_read)
    clients = [
        _evaluating_client(i, pki, keys, digits, federation=aggregator.federation)
        for i in range(CLIENTS)
    ]

    def watch_the_page() -> list[PageReading]:
        driver = _start_chromium(browser, tmp_path / "chromium-profile")
        try:
            _wait_for("a metrics port", lambda: aggregator.metrics_port, time.monotonic() + 60)
            driver.get(f"http://127.0.0.1:{aggregator.metrics_port}/")
            readings = []
            for round_id in range(1, ROUNDS + 1):
                readings.append(_read_round(driver, round_id, time.monotonic() + PAGE_TIMEOUT))
                if round_id == ROUNDS:
                    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                    assert driver.save_screenshot(str(SCREENSHOT)), "no screenshot"
                checked_by_page.add(round_id)
            severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
            assert not severe, f"the page logged errors: {severe}"
            return readings
        except BaseException:
            page_failed.set()
            raise
        finally:
            driver.quit()

    federation = asyncio.create_task(run_federation(aggregator, clients, timeout=600))
    try:
        readings = await asyncio.to_thread(watch_the_page)
    finally:
        checkpoint, results = await federation
    print(f"dashboard screenshot: {SCREENSHOT}")

    assert checkpoint.rounds_completed == ROUNDS
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert sorted(reports) == list(range(1, ROUNDS + 1))
    shown = [reading.round_shown for reading in readings]
    assert shown == sorted(set(shown)) and shown[0] < shown[-1], f"rounds shown: {shown}"
    for round_id, reading in zip(range(1, ROUNDS + 1), readings, strict=True):
        accuracy = reports[round_id].client_metrics["accuracy"]
        assert reading.errors == ""
        assert reading.round_shown == round_id  # held between rounds: the last one shows
        assert reading.connected_clients == str(CLIENTS)
        assert reading.accuracy_value == accuracy  # the aggregator's decrypted figure
        assert abs(float(reading.accuracy_text) - accuracy) <= 0.5e-4 + 1e-12
        assert reading.headline_text == reading.accuracy_text  # the latest is this round's
        assert gauges[round_id] == accuracy  # and Prometheus exports the same
    # Round k's figure is the mean evaluation of the model it started from: the global
    # model after round k-1, as the clients measured it (within one quantization step:
    # the metric travels in the sum, stochastically rounded to value_bits like the model).
    step = 1.0 / (2**aggregator.federation.value_bits - 1)
    for round_id in range(2, ROUNDS + 1):
        expected = accuracy_of(weights_after[round_id - 1], digits)
        assert abs(reports[round_id].client_metrics["accuracy"] - expected) <= step
    assert SCREENSHOT.stat().st_size > 10_000
