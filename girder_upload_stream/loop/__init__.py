"""The long-running loop: the runner, its side jobs, and its wiring."""
