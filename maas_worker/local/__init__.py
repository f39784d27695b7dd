"""Everything on one machine, for the demo and the tests: embedded Redis, worker processes, demo."""
