"""Layer `files` (bottom): files handled safely — atomic writes, modes, writable-folder checks, bounded JSON reads.

Imports the standard library only; every other layer may use it."""
