"""distgen.core."""
