"""Where VGG weights come from, checked before any job uses them.

Sources (the ``--weights`` option, ``STYLEQUEUE_WEIGHTS``):

* ``imagenet``: torchvision's VGG19 ImageNet weights, from torch.hub's cache (downloaded there if
  missing and the network allows; if not, :class:`WeightsUnavailableError` at once, never a silent
  fallback);
* a local file: a full VGG19 state dict (``features.N.*`` and ``classifier.*``) or a features-only
  one (``N.*`` or ``features.N.*``), as written by :func:`export_features`;
* ``scheme://...`` (``s3://`` in practice): fetched by a function the storage layer registers with
  :func:`register_fetcher`, so this module never imports boto3; cached on disk under ``cache_dir``;
* ``random`` / ``random:SEED`` / ``random:SEED:vgg16``: seeded random weights for tests and
  benchmarks only. Every load logs a warning and :attr:`WeightsInfo.random` is set, so outputs
  made with them say so.

Whatever the source, :class:`LoadedWeights` holds only the ``features`` part (``"0.weight"`` ...,
the format of ``torchvision.models.vgg19().features.state_dict()``): the classifier is never
needed for style transfer and is ~470 MB of the 548 MB file. Which network a file holds (VGG19 or
VGG16) is read from its shapes; which input convention (torchvision's or Caffe's) from the
file when stylequeue wrote it (``export_features``, ``stylequeue weights import``), else from the
caller, torchvision's by default. Asking for another convention than the file records is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
import tempfile
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from stylequeue.engine.network import NETWORKS, VGG19, convention as find_convention, features_only, recognise
from stylequeue.engine.sources import is_random, parse_random
from stylequeue.fileio import atomic_file, atomic_path
from stylequeue.exceptions import (
    ConfigError,
    StyleQueueError,
    WeightsChecksumError,
    WeightsError,
    WeightsUnavailableError,
)

log = logging.getLogger(__name__)

IMAGENET_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
# How long to wait for download.pytorch.org before saying "no network" (seconds).
DOWNLOAD_TIMEOUT_S = 10.0
# Extra keys a stylequeue features file carries beside its tensors. weights_only loading allows
# tensors only, so names are stored as uint8 tensors of their UTF-8 bytes.
RANDOM_MARKER = "stylequeue.random_seed"  # a file made from random:SEED
NETWORK_MARKER = "stylequeue.network"
CONVENTION_MARKER = "stylequeue.convention"

Fetcher = Callable[[str, Path], None]
_FETCHERS: dict[str, Fetcher] = {}
_URI_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_ACCEPTED = (
    "'imagenet', a local file path, an s3://bucket/key URI, or 'random[:SEED[:vgg16]]' (tests only)"
)


FEATURE_SHAPES: dict[str, tuple[int, ...]] = VGG19.parameter_shapes()


@dataclass(frozen=True)
class WeightsInfo:
    """What a result's metadata says about the weights that made it."""

    source: str
    sha256: str | None  # of the weights file; None for random weights
    random: bool = False
    seed: int | None = None
    network: str = "vgg19"
    convention: str = "torchvision"  # the input the weights expect (network.CONVENTIONS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LoadedWeights:
    """A VGG ``features`` state dict (CPU, float32) and where it came from.

    The tensors are shared by every caller of :func:`load_weights` in this process: copy them
    (``module.load_state_dict`` does) rather than modify them.
    """

    state_dict: dict[str, torch.Tensor]
    info: WeightsInfo
    recorded_convention: bool = False  # the file said which convention (info.convention) it holds


def register_fetcher(scheme: str, fn: Fetcher) -> None:
    """Let ``scheme://`` weights be loaded: ``fn(uri, dest_path)`` must write the object to dest."""
    _FETCHERS[scheme.lower()] = fn


# --- the public entry point ---------------------------------------------------------------

def load_weights(
    source: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    cache_dir: str | None = None,
    convention: str | None = None,
) -> LoadedWeights:
    """Load VGG feature weights from ``source`` (see the module docstring for the forms).

    ``sha256``, when given, must match the weights file (:class:`WeightsChecksumError` if not).
    ``cache_dir`` keeps fetched ``scheme://`` files between processes; without it they are fetched
    to a temporary directory. ``convention`` (torchvision or caffe) is the input the weights expect:
    None takes the file's own record, else torchvision's; one that contradicts the file's record is
    a :class:`WeightsError`. Every call reads the file: a process that keeps its weights keeps
    them in :mod:`stylequeue.worker.resources`.
    """
    source = str(source).strip()
    sha256 = sha256.strip().lower() if sha256 else None
    if convention is not None:
        find_convention(convention)  # a ConfigError for an unknown name, before any I/O
    loaded = _with_convention(_load(source, sha256, cache_dir), convention)
    if loaded.info.random:
        log.warning(
            "USING RANDOM %s WEIGHTS (%s): the output is NOT a real style transfer. "
            "Random weights are for tests and benchmarks only; use --weights imagenet, a file or "
            "an s3:// URI for real results.",
            loaded.info.network.upper(), source,
        )
    return loaded


def _with_convention(loaded: LoadedWeights, asked: str | None) -> LoadedWeights:
    """The weights with the convention asked for; refused when the file recorded another."""
    recorded = loaded.info.convention
    if asked is None or asked == recorded:
        return loaded
    if loaded.recorded_convention:
        raise WeightsError(
            f"weights {loaded.info.source} expect {recorded}-convention input (recorded in the file), "
            f"but {asked} was asked for; drop the convention setting "
            "(STYLEQUEUE_WEIGHTS_CONVENTION / --weights-convention) or give other weights"
        )
    return dataclasses.replace(loaded, info=dataclasses.replace(loaded.info, convention=asked))


def _load(source: str, sha256: str | None, cache_dir: str | None) -> LoadedWeights:
    if source == "imagenet":
        return _load_file(_imagenet_file(), source, sha256)
    if is_random(source):
        if sha256:
            raise ConfigError("a sha256 was given for random weights, which have no file")
        return _random_weights(source)
    match = _URI_RE.match(source)
    if match and match.group(1).lower() != "file":
        return _load_remote(source, match.group(1).lower(), sha256, cache_dir)
    path = source[len("file://") :] if source.startswith("file://") else source
    looks_like_path = os.path.sep in path or path.endswith((".pth", ".pt")) or os.path.exists(path)
    if not path or not looks_like_path:
        raise ConfigError(f"unknown weights source {source!r} (and no such file); use {_ACCEPTED}")
    return _load_file(Path(path), source, sha256)


# --- sources ------------------------------------------------------------------------------


def _random_weights(source: str) -> LoadedWeights:
    """torchvision's VGG init (Kaiming normal, fan-out, zero bias), from a private generator."""
    seed, net = parse_random(source)
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in net.parameter_shapes().items():
        if name.endswith(".bias"):
            state[name] = torch.zeros(shape)
        else:
            std = math.sqrt(2.0 / (shape[0] * shape[2] * shape[3]))  # gain sqrt(2) / sqrt(fan_out)
            state[name] = torch.empty(shape).normal_(0.0, std, generator=gen)
    name = f"random:{seed}" if net is VGG19 else f"random:{seed}:{net.name}"
    info = WeightsInfo(source=name, sha256=None, random=True, seed=seed, network=net.name)
    return LoadedWeights(state, info)


def imagenet_cache_path() -> Path:
    """Where torch.hub (and so torchvision) keeps the ImageNet VGG19 file (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_URL.rsplit("/", 1)[1]


def _imagenet_file() -> Path:
    """The cached ImageNet file, downloading it first if needed; fails fast without network."""
    path = imagenet_cache_path()
    if path.is_file():
        return path
    try:
        _download(IMAGENET_URL, path, timeout_s=DOWNLOAD_TIMEOUT_S)
    except Exception as exc:  # any network or disk failure means: tell the user how to give weights
        raise WeightsUnavailableError(
            f"the ImageNet VGG19 weights are not in the torch hub cache ({path}) and downloading "
            f"{IMAGENET_URL} failed ({exc}). Give weights another way: a local file "
            f"(--weights /path/vgg19.pth, full or features-only), an object "
            f"(--weights s3://bucket/vgg19-features.pth), or copy {path.name} into {path.parent} "
            f"(TORCH_HOME moves that folder); on a machine with internet, "
            f"`stylequeue weights export --from imagenet -o vgg19-features.pth` writes a "
            f"small file to copy over."
        ) from None
    return path


def _download(url: str, dest: Path, *, timeout_s: float) -> None:
    """Stream ``url`` into ``dest`` atomically, checking torchvision's hash prefix in its name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    expected_prefix = dest.stem.rsplit("-", 1)[-1]
    digest = hashlib.sha256()
    # A private opener: urlopen() caches a process-wide one, proxies included, which would
    # outlive this call and leak into every later HTTP request of the process.
    opener = urllib.request.build_opener()
    with atomic_file(dest) as out, opener.open(url, timeout=timeout_s) as resp:
        while chunk := resp.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
        if not digest.hexdigest().startswith(expected_prefix):
            raise WeightsChecksumError(
                f"downloaded {url} does not match its hash prefix {expected_prefix}"
            )


def _load_remote(uri: str, scheme: str, sha256: str | None, cache_dir: str | None) -> LoadedWeights:
    fetch = _FETCHERS.get(scheme)
    if fetch is None:
        raise WeightsUnavailableError(
            f"cannot load weights from {uri}: nothing can read {scheme}:// URIs in this process. "
            f"Install and configure stylequeue's storage (boto3, STYLEQUEUE_S3_* settings) or pass "
            f"a local file with --weights"
        )
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="stylequeue-weights-") as tmp:
            return _load_file(_fetch(fetch, uri, Path(tmp) / "weights.pth"), uri, sha256)
    name = hashlib.sha256(f"{uri}\n{sha256 or ''}".encode()).hexdigest()[:24]
    cached = Path(cache_dir) / f"{name}-{Path(uri).name or 'weights'}"
    if cached.is_file():
        try:
            return _load_file(cached, uri, sha256)
        except WeightsError as exc:  # a damaged cache entry: fetch again once
            log.warning("cached weights %s for %s unusable (%s); fetching again", cached, uri, exc)
            cached.unlink(missing_ok=True)
    _fetch(fetch, uri, cached)
    try:
        return _load_file(cached, uri, sha256)
    except WeightsError:
        cached.unlink(missing_ok=True)  # never keep a bad file where the next load would trust it
        raise


def _fetch(fetch: Fetcher, uri: str, dest: Path) -> Path:
    """Run a registered fetcher into a temp file beside ``dest``, then rename it into place."""
    try:
        with atomic_path(dest) as tmp:
            fetch(uri, tmp)
    except StyleQueueError:
        raise  # storage errors keep their class: transient ones are retried by the service
    except Exception as exc:
        raise WeightsUnavailableError(f"cannot fetch weights {uri}: {exc}") from None
    return dest


# --- files --------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _load_file(path: Path, source: str, sha256: str | None) -> LoadedWeights:
    where = str(path) if str(path) == source else f"{path} (from {source})"
    if not path.is_file():
        raise WeightsError(
            f"weights file {where} does not exist; check --weights / STYLEQUEUE_WEIGHTS"
        )
    actual = file_sha256(path)
    if sha256 and actual != sha256:
        raise WeightsChecksumError(
            f"weights file {where} has sha256 {actual}, expected {sha256}; the file is corrupt "
            f"or a different one (re-copy it, or fix --weights-sha256 / STYLEQUEUE_WEIGHTS_SHA256)"
        )
    contents = read_features(path, where)
    seed = contents.random_seed
    if seed is not None:
        log.warning("weights file %s holds RANDOM weights (exported from random:%d)", where, seed)
    info = WeightsInfo(source=source, sha256=actual, random=seed is not None, seed=seed,
                       network=contents.network, convention=contents.convention or "torchvision")
    return LoadedWeights(contents.features, info, recorded_convention=contents.convention is not None)


class WeightsFileContents(NamedTuple):
    features: dict[str, torch.Tensor]  # "0.weight" ... , float32
    layout: str  # "full" or "features-only"
    random_seed: int | None  # set when the file was exported from random:SEED
    network: str  # "vgg19" or "vgg16", from the shapes
    convention: str | None  # as recorded by stylequeue; None when the file does not say


def read_features(path: str | Path, where: str | None = None) -> WeightsFileContents:
    """Read and validate a weights file; :class:`WeightsError` says what is wrong with it."""
    where = where or str(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for damaged files; all mean the same
        raise WeightsError(
            f"weights file {where} cannot be read as a PyTorch state dict (truncated or corrupt?): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise WeightsError(
            f"weights file {where} holds a {type(raw).__name__}, not a state dict of tensors"
        )
    return _check_features(raw, where)


def _check_features(raw: dict[str, torch.Tensor], where: str) -> WeightsFileContents:
    marker = raw.pop(RANDOM_MARKER, None)
    random_seed = int(marker.item()) if marker is not None else None
    network_name = _text(raw.pop(NETWORK_MARKER, None))
    convention = _text(raw.pop(CONVENTION_MARKER, None))
    full = any(k.removeprefix("module.").startswith("classifier.") for k in raw)
    layout = "full" if full else "features-only"
    features = features_only(raw)
    net = recognise({k: tuple(v.shape) for k, v in features.items()})
    if net is None:
        raise WeightsError(f"weights file {where} is not a VGG16 or VGG19 state dict: {_mismatch(features)}")
    if network_name is not None and network_name != net.name:
        raise WeightsError(f"weights file {where} says it holds {network_name} but its shapes are {net.name}'s")
    if convention is not None:
        find_convention(convention)
    clean = {k: features[k].detach().to(torch.float32).contiguous() for k in net.parameter_shapes()}
    return WeightsFileContents(clean, layout, random_seed, net.name, convention)


def _mismatch(features: dict[str, torch.Tensor]) -> str:
    """What keeps ``features`` from being the closest known network, in words."""
    closest = max(NETWORKS.values(), key=lambda n: len(set(n.parameter_shapes()) & set(features)))
    expected = closest.parameter_shapes()
    missing = [k for k in expected if k not in features]
    unexpected = [k for k in features if k not in expected]
    wrong = [
        f"{k} is {tuple(features[k].shape)}, expected {shape}"
        for k, shape in expected.items()
        if k in features and tuple(features[k].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors ({_first(missing)})")
    if unexpected:
        problems.append(f"unexpected tensors {_first(sorted(unexpected))} (VGG-BN? other model?)")
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:4]))
    return f"as a {closest.name.upper()}: " + "; ".join(problems)


def _text(tensor: torch.Tensor | None) -> str | None:
    return None if tensor is None else bytes(tensor.to(torch.uint8).tolist()).decode()


def _as_tensor(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def _first(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def export_features(
    source: str | os.PathLike[str],
    dest: str | Path,
    *,
    sha256: str | None = None,
    cache_dir: str | None = None,
    convention: str | None = None,
) -> tuple[Path, str]:
    """Write ``source``'s feature weights to ``dest`` (~80 MB for VGG19) -> (path, its sha256).

    Written atomically, with ``dest + ".sha256"`` beside it in ``sha256sum`` format, so a fleet can
    pull the file and pass the checksum to ``--weights-sha256``. The file records its network and
    input convention (``convention``: as :func:`load_weights` takes it).
    """
    loaded = load_weights(source, sha256=sha256, cache_dir=cache_dir, convention=convention)
    return write_features(loaded.state_dict, dest, network=loaded.info.network,
                          convention=loaded.info.convention,
                          random_seed=loaded.info.seed if loaded.info.random else None)


def write_features(
    state_dict: dict[str, torch.Tensor],
    dest: str | Path,
    *,
    network: str,
    convention: str,
    random_seed: int | None = None,
) -> tuple[Path, str]:
    """Write a features state dict as a stylequeue weights file -> (path, its sha256)."""
    find_convention(convention)
    contents: dict[str, torch.Tensor] = dict(state_dict)
    contents[NETWORK_MARKER] = _as_tensor(network)
    contents[CONVENTION_MARKER] = _as_tensor(convention)
    if random_seed is not None:
        # Random weights stay flagged through a file: outputs made from it must still say so.
        contents[RANDOM_MARKER] = torch.tensor(random_seed, dtype=torch.int64)
    _check_features(dict(contents), str(dest))  # what is written reads back
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        torch.save(contents, tmp)
        digest = file_sha256(tmp)
    sidecar = dest.with_name(dest.name + ".sha256")
    sidecar.write_text(f"{digest}  {dest.name}\n")
    return dest, digest


def describe_file(path: str | Path) -> dict[str, Any]:
    """What ``stylequeue weights info`` prints: size, sha256, layout; WeightsError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    contents = read_features(path)
    sidecar = path.with_name(path.name + ".sha256")
    digest = file_sha256(path)
    recorded = (sidecar.read_text().split() or [None])[0] if sidecar.is_file() else None
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "sha256": digest,
        "sidecar_sha256_matches": None if recorded is None else recorded == digest,
        "layout": contents.layout,
        "tensors": len(contents.features),
        "parameters": sum(t.numel() for t in contents.features.values()),
        "keys_ok": True,
        "random": contents.random_seed is not None,
        "random_seed": contents.random_seed,
        "network": contents.network,
        "convention": contents.convention,  # None: the file does not say (torchvision assumed)
    }

