"""virtkit benchmarks: each suite measures virtkit side by side with its real peer in one run."""
