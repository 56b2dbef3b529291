"""Turning finished runs into tables and plots (ablation tables, PQ-vs-GFLOPs)."""
