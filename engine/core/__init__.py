"""Layer `core` (bottom): the math of sampling — noise schedules, timestep spacing, coefficient rows, step plans,
classifier-free-guidance row rules and the float64 reference that evaluates a row (docs/math.md).

Imports numpy and the standard library only; no other ddengine layer."""
