"""Decoder models of every family (Llama, Gemma, mixture of experts, Phi-3) and their configs."""
