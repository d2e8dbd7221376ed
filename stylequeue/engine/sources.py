"""How weights sources are named, checked without torch (JobSpec validates a job's at submit)."""

from __future__ import annotations

import re

from stylequeue.engine.network import NETWORKS, Network
from stylequeue.exceptions import ConfigError

MAX_RANDOM_SEED = 2**63 - 1  # torch.Generator.manual_seed's range, kept signed


def is_random(source: str) -> bool:
    return source == "random" or source.startswith("random:")


def parse_random(source: str) -> tuple[int, Network]:
    """``random[:SEED[:NETWORK]]`` -> (seed, network); ConfigError saying the form otherwise."""
    _, _, rest = source.partition(":")
    seed_text, _, net_name = rest.partition(":")
    form = "random, random:SEED or random:SEED:NETWORK (random:42:vgg16)"
    # ASCII digits only: str.isdigit() would let "²" through to int(), which refuses it.
    if not re.fullmatch(r"[0-9]+", seed_text or "0") or (net_name and net_name not in NETWORKS):
        raise ConfigError(f"random weights are named {form}, SEED an integer seed, got {source!r}")
    seed = int(seed_text or "0")
    if seed > MAX_RANDOM_SEED:
        raise ConfigError(f"a random-weights seed must be at most {MAX_RANDOM_SEED} (2^63 - 1), got {seed}")
    return seed, NETWORKS[net_name or "vgg19"]
