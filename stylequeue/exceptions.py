"""Every exception stylequeue raises, in one place.

Messages are for the person who sent the job: each says what was wrong and how to fix it.
Only :class:`TransientStorageError` is worth retrying (the tasks' ``autoretry_for``); every other
error fails a job at once instead of burning its retry budget.
"""

from __future__ import annotations


class StyleQueueError(Exception):
    """Base class of every error stylequeue raises on purpose."""


class ConfigError(StyleQueueError, ValueError):
    """A setting, preset or job parameter is invalid (unknown layer, NaN weight, ...)."""


class JobSpecError(ConfigError):
    """A submitted job spec failed validation before anything was queued."""


class ImageError(StyleQueueError, ValueError):
    """An input could not be decoded as an image (empty, not an image, truncated, ...)."""


class ImageTooLargeError(ImageError):
    """An input or requested output exceeds the pixel limit (or is a decompression bomb)."""


class WeightsError(StyleQueueError):
    """VGG19 weights could not be loaded (missing, corrupt, wrong shapes, bad checksum)."""


class WeightsUnavailableError(WeightsError):
    """The requested weights source cannot be reached (for example no network for ``imagenet``)."""


class WeightsChecksumError(WeightsError):
    """The weights file's sha256 does not match the one that was asked for."""


class StorageError(StyleQueueError):
    """Object storage failed. Transient subclasses are retried; the rest fail the job at once."""


class TransientStorageError(StorageError):
    """Connection refused, timeout, 5xx, throttling: worth retrying with backoff."""


class ObjectNotFoundError(StorageError):
    """The named object (or its bucket) does not exist."""


class AccessDeniedError(StorageError):
    """The URI is outside the buckets/prefixes this deployment allows, or climbs out of its root."""


class UnsupportedURIError(StorageError, ValueError):
    """The URI's scheme is not one stylequeue can read or write."""


class NonFiniteLossError(StyleQueueError):
    """The loss became NaN or infinite: weights or a learning rate too large for float32."""


class OutputTakenError(StyleQueueError):
    """A job's output prefix holds another job's result: it is refused, never taken or overwritten."""


class JobTimeoutError(StyleQueueError):
    """The job ran past its time limit."""


class TooManyDeliveriesError(StyleQueueError):
    """A task message was delivered more than ``max_deliveries`` times (its worker kept dying)."""


class LostMessageError(StyleQueueError):
    """The broker lost a job's message more often than recovery may re-send it (or no copy was kept)."""


class WebhookURLError(ConfigError):
    """A webhook URL this deployment does not send to (scheme, credentials, allow-list, address)."""


class WebhookVerificationError(StyleQueueError):
    """A webhook delivery whose signature or timestamp does not verify (forged, altered or replayed)."""


class JobFailedError(StyleQueueError):
    """A job a producer waited on ended FAILED or CANCELLED; the message says why."""

    def __init__(self, message: str, *, job_id: str = "", status: str = "") -> None:
        super().__init__(message)
        self.job_id = job_id
        self.status = status
