"""Consuming and running jobs: the runtime, the pipeline of checks, the Celery task and watchdog.

``worker.batch`` is the second driver of the same pipeline (the batch consumer processes).
"""
