"""Weight map (Hugging Face key <-> parameter path), checkpoint reading and writing."""
