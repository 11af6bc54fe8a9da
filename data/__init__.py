"""The data layer, below the recipes and the evaluation: synthetic tasks (`tasks.py`, one definition per task) and
text documents (`documents.py`). Both the training recipes and the eval harness read from here."""
