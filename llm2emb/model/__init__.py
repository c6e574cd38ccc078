"""What makes an Embedder: the class, its parts and its folder format."""
