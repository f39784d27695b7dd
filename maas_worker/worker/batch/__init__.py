"""The batch consumer: processes that take many jobs per round trip through the pipeline."""
