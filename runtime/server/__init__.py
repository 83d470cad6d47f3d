"""monosemantic serve (under construction)."""
