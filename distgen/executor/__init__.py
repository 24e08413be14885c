"""distgen.executor."""
