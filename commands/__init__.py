"""The command layer: one module per command (its options, what it prints, its exit code); main.py dispatches.

Only this layer prints user-facing text and ends the process. The library underneath (config/, model/,
trainer/) raises typed errors and returns results.
"""
