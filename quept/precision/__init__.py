"""What a client asks for (`PrecisionSpec`), what a sequence runs at (`PrecisionPlan`), and how a
step's plans become width segments for every linear (`segments.py`); mixed allocation by KL.
"""
