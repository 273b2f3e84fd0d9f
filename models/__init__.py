"""MED (paper §3.1): pre-training, fine-tuning and export."""
