"""Video decoding, frame sampling and preprocessing."""
