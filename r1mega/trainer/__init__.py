"""Training loops, optimizer and scheduler set-up, metrics."""
