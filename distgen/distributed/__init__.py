"""distgen.distributed."""
