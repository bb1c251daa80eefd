"""imgworker: upload an image, get 202 at once, warm workers make renditions."""

__version__ = "0.1.0"
