"""Layer `files` (bottom): writing files safely — atomic writes, modes, writable-folder checks.

Imports the standard library only; every other layer may use it."""
