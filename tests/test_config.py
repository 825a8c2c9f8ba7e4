"""ReconnectPolicy, ConnectionConfig and the delay schedule: pure values, no sleeping."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

import chronicle_conn as cc
from chronicle_conn._schedule import DEMAND_DELAY, DelaySchedule
from chronicle_conn.config import ConnectionConfig, LivenessMode, ReconnectPolicy


def take(iterator, n):
    return list(itertools.islice(iterator, n))


# ---------------------------------------------------------------------------- policy


def test_policy_defaults_match_the_design():
    policy = ReconnectPolicy()
    assert policy.retry_attempts == 5
    assert policy.max_attempts == 6
    assert (policy.base_delay, policy.max_delay) == (1.0, 10.0)
    assert (policy.multiplier, policy.jitter) == (2.0, 0.1)
    assert ReconnectPolicy(retry_attempts=None).max_attempts is None
    assert ReconnectPolicy(retry_attempts=0).max_attempts == 1


def test_delays_are_exponential_and_capped_without_jitter():
    policy = ReconnectPolicy(base_delay=0.5, max_delay=5.0, multiplier=2.0, jitter=0.0)
    assert take(policy.delays(), 7) == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_multiplier_one_is_constant():
    policy = ReconnectPolicy(base_delay=0.3, max_delay=0.3, multiplier=1.0, jitter=0.0)
    assert take(policy.delays(), 4) == [0.3] * 4


def test_jitter_stays_within_its_fraction_and_varies():
    policy = ReconnectPolicy(base_delay=1.0, max_delay=8.0, multiplier=2.0, jitter=0.25)
    rng = random.Random(7)
    samples = [take(policy.delays(rng), 5) for _ in range(200)]
    for run in samples:
        for value, nominal in zip(run, [1.0, 2.0, 4.0, 8.0, 8.0], strict=True):
            assert nominal * 0.75 <= value <= nominal * 1.25
    firsts = {round(run[0], 6) for run in samples}
    assert len(firsts) > 150  # really random, not a constant


def test_delays_are_reproducible_with_a_seeded_rng():
    policy = ReconnectPolicy(jitter=0.5)
    assert take(policy.delays(random.Random(1)), 6) == take(policy.delays(random.Random(1)), 6)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"base_delay": 0}, "reconnect_base_delay"),
        ({"base_delay": -1}, "reconnect_base_delay"),
        ({"base_delay": float("nan")}, "reconnect_base_delay"),
        ({"max_delay": 0.5, "base_delay": 1.0}, "reconnect_max_delay"),
        ({"max_delay": float("inf")}, "reconnect_max_delay"),
        ({"multiplier": 0.9}, "reconnect_multiplier"),
        ({"jitter": -0.1}, "reconnect_jitter"),
        ({"jitter": 1.5}, "reconnect_jitter"),
        ({"retry_attempts": -1}, "retry_attempts"),
        ({"retry_attempts": 1.5}, "retry_attempts"),
        ({"retry_attempts": True}, "retry_attempts"),
        ({"base_delay": "1"}, "reconnect_base_delay"),
    ],
)
def test_policy_validation_names_the_option(kwargs, option):
    with pytest.raises(cc.ConfigurationError) as info:
        ReconnectPolicy(**kwargs)
    assert info.value.option == option
    assert option in str(info.value)
    assert isinstance(info.value, ValueError)


def test_policy_is_frozen_and_replace_validates():
    policy = ReconnectPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.base_delay = 2.0  # type: ignore[misc]
    assert dataclasses.replace(policy, base_delay=2.0).base_delay == 2.0
    with pytest.raises(cc.ConfigurationError):
        dataclasses.replace(policy, jitter=2.0)


# ---------------------------------------------------------------------------- schedule


def run_schedule(policy, delays, waiters_at, steps, *, attempt_takes=0.0):
    """Drive a DelaySchedule with a fake clock: every attempt fails.

    ``waiters_at(now)`` says how many callers wait at a time. Returns the attempt start
    times, whether each counted, and whether the budget ran out.
    """
    schedule = DelaySchedule(policy, delays, rng=random.Random(11))
    now = 0.0
    starts, counted = [], []
    for _ in range(steps):
        starts.append(now)
        counted.append(schedule.start(now))
        now += attempt_takes
        schedule.failed(now)
        if schedule.exhausted:
            return starts, counted, True
        now = max(now, schedule.wake_at(waiters_at(now)))
    return starts, counted, False


def gaps(times):
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


def test_schedule_without_demand_follows_the_exponential_delays():
    policy = ReconnectPolicy(retry_attempts=None, base_delay=1.0, max_delay=30.0, jitter=0.0)
    starts, counted, exhausted = run_schedule(policy, policy.delays(), lambda now: 0, 7)
    assert gaps(starts) == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert all(counted)
    assert not exhausted


def test_budget_runs_out_after_retry_attempts_plus_one():
    policy = ReconnectPolicy(retry_attempts=3, base_delay=1.0, max_delay=30.0, jitter=0.0)
    starts, counted, exhausted = run_schedule(policy, policy.delays(), lambda now: 0, 50)
    assert exhausted
    assert counted == [True] * 4
    assert gaps(starts) == [1.0, 2.0, 4.0]


def test_retry_attempts_zero_makes_one_attempt():
    policy = ReconnectPolicy(retry_attempts=0)
    starts, _, exhausted = run_schedule(policy, policy.delays(), lambda now: 0, 50)
    assert exhausted
    assert starts == [0.0]


def test_demand_attempts_on_a_short_cadence_without_spending_the_budget():
    """The defaults give up after about 1+2+4+8+10 = 25 s of failures; a caller wanting
    the connection the whole time gets an attempt every 0.1-0.125 s (at most ten a
    second), and the budget lasts just as long."""
    policy = ReconnectPolicy()  # retry_attempts=5, base 1 s, max 10 s, x2, jitter 0.1
    idle_starts, _, idle_exhausted = run_schedule(
        policy, policy.delays(random.Random(1)), lambda now: 0, 5000
    )
    busy_starts, busy_counted, busy_exhausted = run_schedule(
        policy, policy.delays(random.Random(1)), lambda now: 1, 5000
    )
    assert idle_exhausted
    assert busy_exhausted
    assert len(idle_starts) == 6
    assert sum(busy_counted) == 6  # the same budget...
    assert len(busy_starts) > 150  # ...with many early attempts in between
    assert abs(busy_starts[-1] - idle_starts[-1]) < 1e-9  # and it gives up at the same time
    assert 20 < idle_starts[-1] < 30
    low, high = DEMAND_DELAY
    # never more than the cadence apart (shorter only when a counted one falls due)...
    assert max(gaps(busy_starts)) <= high + 1e-9
    # ...and never more than ten a second, on average and jittered
    assert (len(busy_starts) - 1) / busy_starts[-1] <= 1 / low
    assert len(set(gaps(busy_starts))) > 10


def test_demand_never_delays_a_due_attempt():
    policy = ReconnectPolicy(retry_attempts=None, base_delay=1.0, max_delay=1.0, jitter=0.1)
    starts, counted, _ = run_schedule(policy, itertools.repeat(0.05), lambda now: 1, 20)
    assert gaps(starts) == [0.05] * 19
    assert all(counted)


def test_demand_arriving_mid_backoff_shortens_it():
    policy = ReconnectPolicy(retry_attempts=None, base_delay=1.0, max_delay=60.0, jitter=0.0)
    starts, counted, _ = run_schedule(
        policy, policy.delays(), lambda now: 1 if now >= 31.0 else 0, 12
    )
    # idle: 1, 2, 4, 8, 16 (t = 31); then demand: the short cadence, counted or not
    assert gaps(starts)[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
    low, high = DEMAND_DELAY
    assert all(low <= gap <= high for gap in gaps(starts)[5:])
    assert counted[:6] == [True] * 6
    assert not any(counted[6:])  # the next counted one is due only at t = 31 + 32


def test_attempt_duration_is_part_of_the_cadence():
    policy = ReconnectPolicy(retry_attempts=None, base_delay=1.0, max_delay=60.0, jitter=0.0)
    starts, _, _ = run_schedule(policy, policy.delays(), lambda now: 1, 6, attempt_takes=5.0)
    # a black-holed host: each attempt takes 5 s; the cadence counts from the start of an
    # attempt, so the next one starts as soon as it failed
    assert gaps(starts) == [5.0] * 5


# ---------------------------------------------------------------------------- config


def cs(text="chronicle://127.0.0.1:1?disableTls=true"):
    return cc.ConnectionString.parse(text)


def test_config_normalises_and_validates():
    config = ConnectionConfig(cs(), grpc_options={"grpc.a": 1}, liveness="health")  # type: ignore[arg-type]
    assert config.grpc_options == (("grpc.a", 1),)
    assert config.liveness is LivenessMode.HEALTH


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"liveness": "sometimes"}, "liveness"),
        ({"attempt_timeout": 0}, "attempt_timeout"),
        ({"keepalive_stale_after": -1}, "keepalive_stale_after"),
        ({"close_timeout": 0}, "close_timeout"),
        ({"max_channel_age": 0}, "max_channel_age"),
        ({"drain_timeout": -1}, "drain_timeout"),
        ({"grpc_options": "grpc.a=1"}, "grpc_options"),
        ({"grpc_options": [("grpc.a",)]}, "grpc_options"),
        ({"name": ""}, "name"),
        ({"auto_connect": "yes"}, "auto_connect"),
        ({"connect_fun": 42}, "connect_fun"),
        ({"on_retries_exhausted": "x"}, "on_retries_exhausted"),
    ],
)
def test_config_errors_name_the_option(kwargs, option):
    with pytest.raises(cc.ConfigurationError) as info:
        ConnectionConfig(cs(), **kwargs)
    assert info.value.option == option
    assert option in str(info.value)


def test_certificate_paths_must_exist(tmp_path):
    missing = tmp_path / "nope.pem"
    for key in ("caPath", "certificatePath"):
        with pytest.raises(cc.ConfigurationError) as info:
            ConnectionConfig(cs(f"chronicle://h:1?{key}={missing}"))
        assert info.value.option == key
        assert str(missing) in str(info.value)
    pem = tmp_path / "ca.pem"
    pem.write_text("not checked here, only that it exists")
    assert ConnectionConfig(cs(f"chronicle://h:1?caPath={pem}")).connection_string.ca_path == str(
        pem
    )


def test_connection_keyword_options_reach_the_config():
    conn = cc.Connection(
        "chronicle://127.0.0.1:1?disableTls=true",
        retry_attempts=None,
        reconnect_base_delay=0.2,
        reconnect_max_delay=3.0,
        reconnect_multiplier=1.5,
        reconnect_jitter=0.0,
        auto_connect=False,
        liveness="transport",
        attempt_timeout=2.0,
        keepalive_stale_after=3.0,
        max_channel_age=60.0,
    )
    try:
        config = conn.config
        assert config.policy == ReconnectPolicy(None, 0.2, 3.0, 1.5, 0.0)
        assert config.liveness is LivenessMode.TRANSPORT
        assert (config.attempt_timeout, config.keepalive_stale_after) == (2.0, 3.0)
        assert config.max_channel_age == 60.0
        assert config.auto_connect is False
    finally:
        conn.close()


def test_default_connection_string_and_server_address():
    conn = cc.Connection(auto_connect=False)
    try:
        assert conn.config.connection_string == cc.ConnectionString.default()
    finally:
        conn.close()
    conn = cc.Connection(server_address="127.0.0.1:4000", auto_connect=False)
    try:
        assert conn.config.connection_string.hosts[0].port == 4000
        assert conn.config.connection_string.tls_enabled  # same defaults as a string
    finally:
        conn.close()
