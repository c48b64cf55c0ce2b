"""Issue 10: seeded random interleavings of lifecycle events under load (tests/interleaving.py).

CI runs the seeds below. ``make fuzz`` runs many more: ``SDS_FUZZ_SEEDS`` is a list or range
of seeds (``7`` or ``1-40`` or ``3,9,12``), ``SDS_FUZZ_EVENTS`` the events per sequence.
A failure names its seed; ``SDS_FUZZ_SEEDS=SEED make fuzz`` replays that sequence.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.helpers import Gate
from tests.interleaving import Sequence

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

CI_SEEDS = "1-4"
CI_EVENTS = 10


def seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("-")
        out += list(range(int(first), int(last or first) + 1))
    return out


SEEDS = seeds(os.environ.get("SDS_FUZZ_SEEDS", CI_SEEDS))
EVENTS = int(os.environ.get("SDS_FUZZ_EVENTS", str(CI_EVENTS)))


@pytest.mark.timeout(420)
@pytest.mark.parametrize("seed", SEEDS)
async def test_random_interleaving_keeps_the_invariants(
    seed: int, tmp_path: Path, listen_sock: socket.socket, gate: Gate
) -> None:
    sequence = Sequence(seed, EVENTS, tmp_path, listen_sock, gate)
    try:
        await sequence.run()
        await sequence.check()
    except BaseException:
        print("\n".join(["-- events:", *sequence.log]))
        raise
    finally:
        print(f"\n{sequence.report()}")
    assert not sequence.problems, (
        f"seed {seed} broke the invariants (replay: SDS_FUZZ_SEEDS={seed} make fuzz):\n"
        + "\n".join(sequence.problems)
        + "\n-- events:\n"
        + "\n".join(sequence.log)
    )
