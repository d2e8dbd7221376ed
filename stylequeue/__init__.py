"""stylequeue: neural style transfer as a distributed GPU job service.

The algorithm lives in :mod:`stylequeue.engine` and knows nothing of queues or storage;
:mod:`stylequeue.scheduler` is what a producer imports to submit jobs.
"""

__version__ = "0.1.0"
