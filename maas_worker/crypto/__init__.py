"""The sealed envelope and the primitives under it: pure functions, no I/O."""
