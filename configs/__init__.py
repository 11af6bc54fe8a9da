"""The zoo: named, ready-to-use hybrid architectures and sizes (see `zoo.py`)."""
