"""Host-side input processing: images, prompt, tokenizer, rope position ids."""
