"""Beam pipelines for CapFilt."""
