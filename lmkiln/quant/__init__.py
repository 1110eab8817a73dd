"""Quantization: calibration statistics, AWQ scale/clip search, RTN, AutoAWQ format and packing."""
