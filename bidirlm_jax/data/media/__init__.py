"""Media on the host (numpy, no model): decoding, resizing, features and layout of images and audio for the towers."""
