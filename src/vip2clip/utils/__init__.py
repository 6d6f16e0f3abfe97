"""Small shared jobs, each written once: atomic file writes, file hashing, progress reporting."""
