"""Owning jobs: ``queue_session`` (one job), ``queue_batch`` (many) and their asyncio driver."""
