"""Client of monosemantic serve (under construction)."""
