"""Object storage by URI: ``s3://bucket/key`` (boto3; AWS, MinIO, moto) and ``file:///abs/path``.

```python
from stylequeue.storage import open_storage
store = open_storage(settings)            # checks the allow-list on every call, before any request
store.put_bytes("s3://bucket/stylequeue/jobs/j1/result.png", data, content_type="image/png")
store.get_bytes(uri); store.exists(uri); store.list(prefix); store.delete(uri)
store.presign(uri, expires_s=3600)        # s3:// only
```

Errors: :class:`ObjectNotFoundError` (missing object or bucket), :class:`AccessDeniedError`
(outside the allowed prefixes, ``..`` out of a root, refused credentials), :class:`UnsupportedURIError`
(unknown scheme), :class:`TransientStorageError` (after ``storage_retries`` retries with backoff).
"""

from stylequeue.storage.fetchers import install_weights_fetchers, weights_storage
from stylequeue.storage.store import Storage, backoff_delay, open_storage
from stylequeue.storage.uri import Location, parse_uri

__all__ = [
    "Location",
    "Storage",
    "backoff_delay",
    "install_weights_fetchers",
    "open_storage",
    "parse_uri",
    "weights_storage",
]
