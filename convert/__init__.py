"""Training run → quantised TFLite → verified, self-describing bundle for the device."""
