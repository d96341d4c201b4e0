"""The RL trainer: set-up, one step read as its phases, batches, the loss, evaluation, memory turns."""
