"""Server side: the vLLM endpoint plugin, its routes and the gate every request passes."""
