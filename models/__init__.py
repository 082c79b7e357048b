"""ecso.models."""
