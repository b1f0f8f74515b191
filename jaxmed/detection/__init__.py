"""Nodule detection in whole scans: heatmap targets and their loss (targets, loss), heatmap peaks,
whole-volume inference and validation sensitivities. Each module is one idea with its own test."""
