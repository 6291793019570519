"""The tiny demo: a random Qwen3.5 checkpoint, its tokenizer and the chat data they ship with."""
