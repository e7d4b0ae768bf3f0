"""Shared pytest fixtures: the local AWS emulators (ministack + kinesalite) for integration tests.

Place in the flow: tests of every stage that talks to AWS use these session-scoped servers,
started once on loopback ports the OS picked and stopped at the end of the session.
``aws_env`` also points this process's boto3 at them, so code under test needs no endpoint
arguments, exactly as in production where the SDK finds AWS on its own.

``ca``, ``broker`` and ``kinesalite`` are module-scoped instead: each test module that publishes
through MQTT into Kinesis (helpers in mqtt_stream.py) gets a CA, a broker and a kinesalite of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.local.broker import Broker, start_broker
from infra.local.certs import LocalCA
from infra.local.emulators import Emulator, start_kinesalite, start_ministack
from infra.local.emulators import aws_env as build_aws_env


@pytest.fixture(scope="session")
def emulator_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("aws-state")


@pytest.fixture(scope="session")
def ministack(emulator_state_dir: Path) -> Iterator[Emulator]:
    emulator = start_ministack(emulator_state_dir)
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def kinesis(emulator_state_dir: Path) -> Iterator[Emulator]:
    emulator = start_kinesalite(emulator_state_dir)
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def aws_env(ministack: Emulator, kinesis: Emulator) -> Iterator[dict[str, str]]:
    """The emulator environment, also set in ``os.environ`` for the rest of the session."""
    env = build_aws_env(ministack, kinesis)
    with pytest.MonkeyPatch.context() as patch:
        # A developer's real profile or session token must not leak into local calls.
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        yield env


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA.load_or_create(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def broker(ca: LocalCA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with start_broker(tmp_path_factory.mktemp("broker"), ca) as b:
        yield b


@pytest.fixture(scope="module")
def kinesalite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    emulator = start_kinesalite(tmp_path_factory.mktemp("kinesalite"))
    try:
        yield emulator
    finally:
        emulator.stop()
