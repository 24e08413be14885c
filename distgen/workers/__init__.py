"""distgen.workers."""
