"""Making jobs: ``enqueue``, unique jobs and recurring schedules."""
