"""Writing a bundle folder: staging inside it, atomic moves, the manifest's records."""
