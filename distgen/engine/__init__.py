"""distgen.engine."""
