"""The job queues kombu owns (``MAAS_BROKER_URL``): transport, atomic take, entry checks, order."""
