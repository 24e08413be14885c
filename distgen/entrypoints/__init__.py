"""distgen.entrypoints."""
