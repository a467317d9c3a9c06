"""Workstation training: photos/<person>/ → aligned face crops → fine-tuned MobileNetV2 run directory."""
