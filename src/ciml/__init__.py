"""ciml: Complementary Information Mutual Learning for multimodal medical image segmentation."""

__version__ = "0.1.0"
