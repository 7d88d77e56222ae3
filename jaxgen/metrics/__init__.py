"""Evaluation metrics: Frechet distance, IS, precision/recall, image, codebook and LM metrics,
the offline Fashion-MNIST feature network and the perceptual-distance interface."""
