"""ecso.export."""
