"""Llama-family decoder models and their configs."""
