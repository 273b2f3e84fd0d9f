"""capfilt: BLIP CapFilt."""
__version__ = "0.1.0"
