"""Fine-tuning recipes (EAT-style), one file per downstream task; see `common.py`."""
