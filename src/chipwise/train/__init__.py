"""Training: optimizer, the jitted step, checkpoints, metrics and the loop that ties them together."""
