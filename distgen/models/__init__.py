"""distgen.models."""
