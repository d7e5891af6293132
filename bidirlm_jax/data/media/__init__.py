"""Media on the host: decoding, resizing and laying out images and audio for the towers (numpy, no model)."""
