"""distgen.layers."""
