"""Evaluation of unlearning: metrics (plain torch), forget sets from packaged data, the harness behind
`r2f evaluate` and `benchmarks/unlearning.py`, and Markdown/HTML reports."""
