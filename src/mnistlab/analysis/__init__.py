"""Analyses over trained models: robustness reports, the report's reproduction and run comparisons."""
