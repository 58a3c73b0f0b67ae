"""Models: load Hugging Face models from local folders and split them into ordered blocks."""
