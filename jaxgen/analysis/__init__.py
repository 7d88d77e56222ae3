"""Analyses of trained models (e.g. DiT-MoE expert routing: `jaxgen.analysis.routing`)."""
