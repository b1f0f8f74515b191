"""jaxmed: train 3D CNNs on CT nodule crops with JAX/Flax, on any device mesh."""
