"""The engine core: scheduler and executor, one step at a time, in its own process."""
