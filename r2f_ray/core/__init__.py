"""The math of R2F in plain torch: gradient capture, LoRA sketches, linear algebra helpers.

Nothing in this package imports Ray, so every piece is unit-testable in milliseconds.
"""
