"""Monitoring: the Flower launcher and a Prometheus exporter for what Flower lacks.

Flower shows tasks and workers and serves task metrics; it does not export the length of the
broker's queues, which is what an autoscaler needs. :mod:`stylequeue.monitoring.queues` does.
"""

from stylequeue.monitoring.queues import QueueKeys, queue_keys, queue_lengths, unacked_counts

__all__ = ["QueueKeys", "queue_keys", "queue_lengths", "unacked_counts"]
