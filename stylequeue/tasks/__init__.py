"""Celery side of stylequeue: the app (:mod:`.app`) and its thin tasks, all on
:class:`.base.JobTask`: a job's chain (:mod:`.chain`), tiles (:mod:`.tiles`), contact sheets
(:mod:`.sheet`)."""
