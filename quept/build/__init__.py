"""Building elastic checkpoints: source readers, the nested quantizer, the RTN build and the
default-model cache (builder.py), and the one-shot QuEPT calibration (calibration/).
"""
