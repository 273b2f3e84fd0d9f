"""Ingest: DATA resolution, URL lists, URL safety and downloading with img2dataset."""
