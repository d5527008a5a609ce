"""Capacity planning: one rank of an N-GPU job simulated with the trainer's own code (see plan)."""
