"""Observing a training run: what it measures about itself (memory, time) while it runs."""
