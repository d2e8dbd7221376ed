"""Celery side of stylequeue: the app (:mod:`.app`) and its thin tasks (:mod:`.jobs`)."""
