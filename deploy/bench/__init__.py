"""``modstream bench``: each method measured side by side with its baseline, in one run,
so ratios hold on a noisy machine. One module per suite; report.py prints and records."""
