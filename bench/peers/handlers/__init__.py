"""Code that runs inside each peer's own environment (not the project's): the shared
generation call and one small handler per peer. Copied next to each peer's model files."""
