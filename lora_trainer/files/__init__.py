"""File primitives, the lowest layer: it imports only the stdlib, torch, safetensors and errors."""
